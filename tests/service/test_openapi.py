"""The OpenAPI document tells a client everything it can get back: every error response of every /v1
route with the error body's schema, the bearer scheme, and this server's input limits."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.tasks.base import tasks

ERRORS = {"400", "401", "404", "408", "413", "415", "422", "500", "503", "504"}


def spec(**settings) -> dict:
    return TestClient(create_app(Settings(**settings))).get("/openapi.json").json()


def resolve(doc: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_every_v1_route_documents_its_error_responses_with_the_error_schema():
    doc = spec()
    operations = {path: doc["paths"][path]["post"] for path in (f"/v1/{name}" for name in tasks())}
    operations["/v1/models"] = doc["paths"]["/v1/models"]["get"]
    for path, operation in operations.items():
        expected = ERRORS if path != "/v1/models" else {"401"}
        assert expected <= set(operation["responses"]), path
        for status in expected:
            response = operation["responses"][status]
            assert response["description"], (path, status)
            body = resolve(doc, response["content"]["application/json"]["schema"])
            assert body["required"] == ["error"], (path, status)
            error = resolve(doc, body["properties"]["error"])
            assert set(error["required"]) == {"code", "message"}, (path, status)
    assert "Retry-After" in operations["/v1/vqa"]["responses"]["503"]["description"]


def test_bearer_scheme_is_documented_and_required_when_a_key_is_set():
    doc = spec(api_key="secret")
    assert doc["components"]["securitySchemes"]["bearer"] == {
        **doc["components"]["securitySchemes"]["bearer"],
        "type": "http",
        "scheme": "bearer",
    }
    for name in tasks():
        assert doc["paths"][f"/v1/{name}"]["post"]["security"] == [{"bearer": []}]
    assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert "security" not in spec()["paths"]["/v1/vqa"]["post"]  # no key: nothing to send


def test_limits_are_stated_in_the_route_descriptions():
    limits = {
        "max_request_bytes": 1_234_567,
        "max_upload_bytes": 765_432,
        "max_image_pixels": 3_333_333,
        "max_request_pixels": 7_777_777,
        "max_candidates": 11,
        "max_question_chars": 99,
        "max_top_k": 7,
    }
    doc = spec(limits=limits)
    for name in tasks():
        description = doc["paths"][f"/v1/{name}"]["post"]["description"]
        for value in limits.values():
            assert str(value) in description, (name, value)
