"""The fuzzers' leak oracle (tests/fuzz/conftest.py `leaks_in`) tells a source file name from
random token text. Regression: a JWT whose signature segment began with "py" ("…J9.py2a…")
failed both fuzzers as "body carries '.py'" (CI, 2026-12-01)."""

from __future__ import annotations

from tests.fuzz.conftest import leaks_in

TOKEN_BODY = (
    '{"access_token":"eyJ0eXAiOiJhdCtqd3QifQ.eyJqdGkiOiI1NjNhZDJlYzNkOWI0OGNlYmM5ZGE3NGNjZmY5MjlhMiJ9'
    '.py2a7GDK1rnBxwY129D-plqYWH7-61GpoQZ2djd6aEy9oAy3yfZ0iyKq","token_type":"Bearer"}'
)


def test_a_token_whose_signature_starts_with_py_is_no_leak() -> None:
    assert leaks_in(TOKEN_BODY, ("Traceback", "broker/")) == []


def test_a_traceback_line_is_a_leak() -> None:
    line = 'File "/srv/app/broker/tokens.py", line 120, in get'
    assert leaks_in(line, ("Traceback",)) == ["s.py"]
    assert leaks_in(line, ("broker/",)) == ["broker/", "s.py"]


def test_a_module_named_with_its_line_number_is_a_leak() -> None:
    assert leaks_in("error at routes.py:88", ()) == ["s.py"]
    assert leaks_in("routes.py", ()) == ["s.py"]


def test_the_literal_leaks_are_found() -> None:
    assert leaks_in("key tbk_secret here", ("tbk_secret",)) == ["tbk_secret"]
