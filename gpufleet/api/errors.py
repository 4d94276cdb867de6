"""The one exception hierarchy of gpufleet.

Every error a client can see is a :class:`GpufleetError` carrying its HTTP status and
OpenAI error ``type``/``code``; the web layers map it to a response in one place
(``gpufleet.web.errors``). Nothing here imports a web framework.
"""

from __future__ import annotations

from typing import Any


class GpufleetError(Exception):
    """Base of every error gpufleet reports to a client."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def to_openai(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class ConfigError(GpufleetError):
    """A setting or configuration file is invalid; raised at start-up, never per request."""

    code = "invalid_configuration"


class InvalidRequest(GpufleetError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(GpufleetError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GpufleetError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GpufleetError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class PayloadTooLarge(GpufleetError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class Overloaded(GpufleetError):
    """Every eligible queue is full: come back later."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds; never advertise 0, which invites a retry storm.
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class Unavailable(GpufleetError):
    """The part that would serve this request is down (a group that failed to load, a dead pod)."""

    status_code = 503
    error_type = "server_error"
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 5.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        # Always set: a client should not have to guess when a part that is down may be back.
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class UpstreamError(GpufleetError):
    """A pod server failed mid-request after the router had committed to it."""

    status_code = 502
    error_type = "server_error"
    code = "upstream_error"


class InternalError(GpufleetError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"
