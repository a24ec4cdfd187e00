"""Every failure a client can cause, mapped to a status and a JSON body in one place:
{"error": {"code": "...", "message": "..."}}. Anything unexpected is logged and answered 500
without internals."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tokenlean")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def bad_request(message: str) -> APIError:
    return APIError(400, "bad_request", message)


def invalid(message: str) -> APIError:
    return APIError(422, "invalid_request", message)


def too_large(message: str) -> APIError:
    return APIError(413, "payload_too_large", message)


def unsupported_media(message: str) -> APIError:
    return APIError(415, "unsupported_media_type", message)


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(
        503, "overloaded", "the request queue is full; retry later", {"Retry-After": str(retry_after_s)}
    )


def unavailable(message: str) -> APIError:
    return APIError(503, "unavailable", message, {"Retry-After": "5"})


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _describe(errors: list) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

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
