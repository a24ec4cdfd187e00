"""The one place where errors become HTTP: each domain error's status and code, and the JSON body
{"error": {"code": "...", "message": "..."}}. Anything unexpected is logged and answered 500
without internals."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    BadInput,
    DeadlineExceeded,
    InvalidInput,
    NotServed,
    Overloaded,
    ServiceError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnsupportedMedia,
)

log = logging.getLogger("tokenlean")

STATUS: dict[type[ServiceError], tuple[int, str]] = {
    BadInput: (400, "bad_request"),
    Unauthorized: (401, "unauthorized"),
    NotServed: (404, "not_found"),
    TooLarge: (413, "payload_too_large"),
    UnsupportedMedia: (415, "unsupported_media_type"),
    InvalidInput: (422, "invalid_request"),
    Overloaded: (503, "overloaded"),
    Unavailable: (503, "unavailable"),
    DeadlineExceeded: (504, "deadline_exceeded"),
}


def status_of(exc: ServiceError) -> tuple[int, str]:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500, "internal_error"


def headers_of(exc: ServiceError) -> dict[str, str] | None:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers or None


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def response_for(exc: ServiceError) -> JSONResponse:
    status, code = status_of(exc)
    return error_response(status, code, exc.message, headers_of(exc))


def _describe(errors: list) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", _describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
