"""The broker with its fast path turned off, served like `token-broker serve` (for comparison only).

`python -m bench.starlette_path --config FILE --workers N --port P`: needs [redis] url in FILE.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from bench.common import UVICORN_SETTINGS


def create() -> Starlette:
    from broker.api import create_app
    from broker.logs import configure_logging
    from broker.settings import load_settings

    configure_logging()
    return create_app(load_settings(), fast_path=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ["BROKER_CONFIG"] = str(Path(args.config).resolve())
    uvicorn.run(
        "bench.starlette_path:create",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        **UVICORN_SETTINGS,
    )


if __name__ == "__main__":
    main()
