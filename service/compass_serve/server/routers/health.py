"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter
from fastapi.responses import Response

from compass_serve.server import schemas
from compass_serve.server.metrics import PROMETHEUS_CONTENT_TYPE
from compass_serve.server.problems import Problem
from compass_serve.server.routers.images import Svc


def create_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=schemas.Health, summary="Liveness: the process answers")
    async def healthz() -> schemas.Health:
        return schemas.Health(status="ok")

    @router.get(
        "/readyz", response_model=schemas.Health, responses={503: {"description": ""}},
        summary="Readiness: weights loaded, database reachable, encode worker running",
    )
    async def readyz(svc: Svc) -> schemas.Health:
        checks = await anyio.to_thread.run_sync(svc.checks)
        # "ok: <detail>" is ok with information attached (e.g. the workers and their devices).
        failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok" and not v.startswith("ok:"))
        if failing:
            raise Problem(503, f"not ready ({failing})", code="not_ready", checks=checks)
        return schemas.Health(status="ready", checks=checks)

    @router.get(
        "/metrics", response_class=Response, summary="Prometheus metrics",
        responses={200: {"content": {PROMETHEUS_CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                         "description": "Prometheus text exposition format"}},
    )
    async def metrics(svc: Svc) -> Response:
        return Response(svc.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    return router
