"""The one place where errors become HTTP responses, for the pod server and the router alike."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gpufleet.api.errors import GpufleetError, InternalError, InvalidRequest, MethodNotAllowed, NotFound

log = logging.getLogger(__name__)
# pydantic names the member of a union that failed in the error's location ("input.list[int].0"):
# a type, not a field, so it stays out of ``param``. Field names are never capitalised or bracketed.
_UNION_TAG = re.compile(
    r"^(str|int|float|bool|none|constrained-\w+|[a-z]+\[.*\]|[A-Z]\w*(\[.*\])?|function-\w+\[.*\])$"
)


def error_response(exc: GpufleetError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=exc.headers())


def validation_error(exc: RequestValidationError) -> GpufleetError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    if first.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", code="invalid_json")
    msg = str(first.get("msg", "invalid request"))
    kind = first.get("type")
    if kind in _NAMED_CODES:  # raised by gpufleet.api.fields: the message names the field already
        named = (first.get("ctx") or {}).get("param")
        param = ".".join([*loc, str(named)] if named else loc) or None
        return InvalidRequest(f"{param}: {msg}" if param else msg, param=param, code=str(kind))
    param = ".".join(loc) or None
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


# A field we do not know, or one we know and do not implement: OpenAI's own codes for both.
_NAMED_CODES = frozenset({"unknown_parameter", "unsupported_parameter"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GpufleetError)
    async def _gpufleet(_: Request, exc: GpufleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {exc.detail}" if exc.detail != "Not Found" else "no such route"))
        if exc.status_code == 405:
            # Every method of every route at this path (the framework names only the first route's).
            allow = _allowed_methods(request) or (exc.headers or {}).get("Allow", "")
            return error_response(MethodNotAllowed(f"method not allowed; allowed: {allow}", allow=allow))
        err = GpufleetError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(InternalError(f"internal error: {type(exc).__name__}"))


def _allowed_methods(request: Request) -> str:
    scope = {"type": "http", "path": request.url.path, "method": "", "root_path": ""}
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods - {"HEAD"}))
