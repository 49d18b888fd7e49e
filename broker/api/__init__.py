"""The HTTP API: Starlette app, routes, middleware."""

from broker.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
