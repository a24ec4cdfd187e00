"""The one place where errors become HTTP: each domain error's status and code, and the JSON body
{"error": {"code": "...", "message": "..."}}, or the Open Inference Protocol's {"error": "..."} for
a request under /v2 (`protocol`), whoever answers it: a route, the middleware refusing it before
routing (app/limits.py), the shutdown guard. Anything unexpected is logged and answered 500
without internals."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (
    BadInput,
    ClientClosed,
    DeadlineExceeded,
    InvalidInput,
    NotServed,
    Overloaded,
    ServiceError,
    SlowBody,
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
    SlowBody: (408, "request_timeout"),
    TooLarge: (413, "payload_too_large"),
    UnsupportedMedia: (415, "unsupported_media_type"),
    InvalidInput: (422, "invalid_request"),
    # nginx's code for a client that closed the connection; nobody reads the answer, but the
    # metrics and the log tell it apart from server errors
    ClientClosed: (499, "client_closed_request"),
    Overloaded: (503, "overloaded"),
    Unavailable: (503, "unavailable"),
    DeadlineExceeded: (504, "deadline_exceeded"),
}


WHEN = {
    400: "unreadable input: bad JSON, base64 or image data",
    401: "missing or wrong bearer token (when the server sets TOKENLEAN_API_KEY)",
    404: "no model serves this task on this server",
    408: "the request body did not arrive within the read deadline",
    413: "the body, an image, or the pixels of an image or of the request over their limit",
    415: "not an image in an accepted format, or a content type other than JSON and multipart",
    422: "invalid fields, compression or method (the message says what is allowed), or over a limit",
    500: "a server bug; client input never causes one",
    503: "the queue is full, the models are still loading, or the server is shutting down",
    504: "the request's deadline passed before its model call started",
}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI `responses` for these statuses: the error body, when each happens, and its codes."""
    out = {}
    for status in statuses:
        codes = sorted({c for s, c in STATUS.values() if s == status}) or ["internal_error"]
        description = f"{WHEN[status]}. `error.code`: {', '.join(f'`{c}`' for c in codes)}"
        if status == 503:
            description += "; with `Retry-After`"
        out[status] = {"model": ErrorBody, "description": description}
    return out


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
    if isinstance(exc, SlowBody):  # the rest of the body may still come: drop the connection
        headers["Connection"] = "close"
    return headers or None


def protocol(path: str) -> str:
    """The API a request path belongs to: "v2" (the Open Inference Protocol: /v2 and below, app/v2/)
    or "v1" (everything else)."""
    return "v2" if path == "/v2" or path.startswith("/v2/") else "v1"


def error_response(
    status: int, code: str, message: str, headers: dict | None = None, path: str = ""
) -> JSONResponse:
    """An error answer to a request for `path`: the same status and headers on every path; the
    body is /v1's {"error": {"code", "message"}} or, under /v2, the protocol's {"error": message}."""
    # A message may quote client input; a lone surrogate in it could not be encoded as UTF-8.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    error = message if protocol(path) == "v2" else {"code": code, "message": message}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def response_for(exc: ServiceError, path: str = "") -> JSONResponse:
    status, code = status_of(exc)
    return error_response(status, code, exc.message, headers_of(exc), path)


def _describe(errors: list) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    """The error handlers of `app` (the application, and the /v2 sub-application it mounts)."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return response_for(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", _describe(exc.errors()), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, code, str(exc.detail), headers, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error", path=request.url.path)
