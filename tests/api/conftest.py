"""Fixtures of the in-process API tests."""

from __future__ import annotations

from typing import Any

import pytest

from broker.api.fastpath import FastPath


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per request that reached the fast path's checks: True if it answered it."""
    calls: list[bool] = []
    original = FastPath._hit

    def spy(self: FastPath, scope: dict[str, Any]) -> Any:
        answer = original(self, scope)
        calls.append(answer is not None)
        return answer

    monkeypatch.setattr(FastPath, "_hit", spy)
    return calls
