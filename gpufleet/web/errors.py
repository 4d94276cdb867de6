"""The one place where errors become HTTP responses, for the pod server and the router alike."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpufleet.api.errors import GpufleetError, InternalError, InvalidRequest, NotFound

log = logging.getLogger(__name__)


def error_response(exc: GpufleetError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=exc.headers())


def validation_error(exc: RequestValidationError) -> GpufleetError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", code="invalid_json")
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid request"))
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GpufleetError)
    async def _gpufleet(_: Request, exc: GpufleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {exc.detail}" if exc.detail != "Not Found" else "no such route"))
        err = GpufleetError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(InternalError(f"internal error: {type(exc).__name__}"))
