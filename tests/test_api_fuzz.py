"""Schemathesis against the served OpenAPI document: generated requests for every operation
never produce a 5xx, and responses conform to the documented schemas."""

import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="part of the README's dev install")
from hypothesis import settings  # noqa: E402

from doe_runtime.server import create_app  # noqa: E402


@pytest.fixture
def api_schema(tiny_bundles, tmp_path):
    root, _ = tiny_bundles
    copy = tmp_path / "artifacts"
    shutil.copytree(root, copy)
    app = create_app(copy, max_items=16, device="cpu")
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None)
def test_api_never_answers_5xx(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    # every documented check except positive-data acceptance: whether a schema-valid body fits the
    # task (single texts vs pairs) depends on the path's task, which the schema cannot express
    case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])
