"""Serve the OpenAPI document finished by gpufleet.api.openapi instead of the framework's draft."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gpufleet.api.openapi import complete_document
from gpufleet.web.health import OPEN_PATHS


def install_openapi(app: FastAPI, *, router: bool, open_paths: Iterable[str] = OPEN_PATHS) -> None:
    """``open_paths``: those served without the API key (no 401 documented)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            draft = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = complete_document(draft, router=router, open_paths=open_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
