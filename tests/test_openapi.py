"""openapi.yaml is the contract: it must be a valid OpenAPI 3.1 document describing exactly the routes."""

from __future__ import annotations

import re
from typing import Any

import yaml
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from broker.api import create_app
from broker.settings import Settings
from tests.support import REPO_ROOT

_METHODS = {"get", "post", "put", "patch", "delete"}


def _document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO_ROOT / "broker" / "openapi.yaml").read_text(encoding="utf-8"))
    return doc


def test_openapi_document_is_valid_3_1() -> None:
    doc = _document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_openapi_describes_exactly_the_routes() -> None:
    app = create_app(Settings())
    served = {
        (re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method.lower())  # {subject:path} is {subject} there
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method.lower() in _METHODS
    }
    documented = {
        (path, method) for path, item in _document()["paths"].items() for method in item if method in _METHODS
    }
    assert served - documented == set(), "routes missing from openapi.yaml"
    assert documented - served == set(), "openapi.yaml describes routes that do not exist"


def test_openapi_served_at_its_route(client: TestClient) -> None:
    response = client.get("/openapi.yaml")
    assert response.status_code == 200
    assert yaml.safe_load(response.text) == _document()
