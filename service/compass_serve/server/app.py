"""`create_app(settings)`: the FastAPI application, all state created per app (no module globals)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from compass_serve import __version__
from compass_serve.server import problems
from compass_serve.server.metrics import MetricsMiddleware
from compass_serve.server.routers import health, images, model, viewer
from compass_serve.server.service import ImageService
from compass_serve.server.settings import Settings

DESCRIPTION = """\
Progressive image delivery on COMPASS, a learned codec with arbitrary-scale spatial scalability.

Upload an image once; fetch it at any width (`GET /images/{id}?width=N`), or fetch the coded
bitstream's layers with HTTP range requests built from the manifest (`byte_end` is inclusive).
Every error is an RFC 9457 `application/problem+json` document.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing touches the disk until the lifespan starts it."""
    settings = settings or Settings()
    service = ImageService(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.make_limiters()
        # Loading weights and recovering state are blocking: off the event loop.
        await anyio.to_thread.run_sync(service.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(title="compass-serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.state.settings = settings
    app.state.pattern_hints = images.pattern_hints(service.output_formats)
    problems.install(app)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    app.include_router(health.create_router())
    app.include_router(images.create_router(settings, service.output_formats))
    app.include_router(model.create_router())
    if settings.viewer:
        app.include_router(viewer.create_router())
        app.mount(viewer.ASSETS_PATH, viewer.assets(), name="viewer-assets")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = problems.problem_openapi(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
