"""The package surface: `__all__` is sorted, complete and importable (as httpx checks its own)."""

import broker


def test_all_is_sorted_and_names_only_public_members() -> None:
    assert broker.__all__ == sorted(broker.__all__)
    public = {name for name in dir(broker) if not name.startswith("_") and not _is_submodule(name)}
    assert set(broker.__all__) == public


def test_every_exported_name_resolves() -> None:
    for name in broker.__all__:
        assert getattr(broker, name) is not None


def _is_submodule(name: str) -> bool:
    return type(getattr(broker, name)).__name__ == "module"


def test_the_command_line_does_not_import_prometheus_client_early() -> None:
    """`serve` must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is first imported, or a
    single-worker broker keeps its metrics in memory where /metrics (multiprocess) cannot see them."""
    import subprocess
    import sys

    code = "import sys, broker, broker.cli; print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
