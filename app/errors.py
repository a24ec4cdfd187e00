"""Domain errors: what went wrong, in the data plane's words. Nothing here knows HTTP; the status
code and JSON body of each error are decided in one place, app/http_errors.py."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a request can end in. `retry_after_s`: when retrying makes sense."""

    retry_after_s: int | None = None

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class BadInput(ServiceError):
    """Input that cannot be read: bad JSON, bad base64, a corrupt image."""


class InvalidInput(ServiceError):
    """Readable input whose values are not allowed (fields, compression, method, limits)."""


class TooLarge(ServiceError):
    """A body, an image or a request's pixels over their limit."""


class UnsupportedMedia(ServiceError):
    """Not an image we decode, or a content type we do not take."""


class ClientClosed(ServiceError):
    """The client went away before its request was read or answered (an aborted upload)."""


class SlowBody(ServiceError):
    """The request body did not arrive within the read deadline."""


class Unauthorized(ServiceError):
    """Missing or wrong credentials."""


class NotServed(ServiceError):
    """No model serves this task on this server."""


class Overloaded(ServiceError):
    """The task's queue is full."""

    retry_after_s = 1


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its model call could start."""


class Unavailable(ServiceError):
    """Not ready, failed to load, or shutting down."""

    retry_after_s = 5
