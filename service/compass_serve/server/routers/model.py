"""`GET /model`: what new uploads are encoded with, so clients can offer the right quality range."""

from __future__ import annotations

from fastapi import APIRouter

from compass_serve.server import schemas
from compass_serve.server.routers.images import Svc


def create_router() -> APIRouter:
    router = APIRouter(tags=["model"])

    @router.get(
        "/model", response_model=schemas.EncoderModel, responses={503: {"description": ""}},
        summary="The encoder's model: name, weights version, quality range and default",
    )
    async def model(svc: Svc) -> schemas.EncoderModel:
        codec = svc.require_codec()
        return schemas.EncoderModel(
            name=codec.name, weights_id=codec.weights_id.hex(), qualities=codec.qualities,
            default_quality=codec.model.default_quality, lambdas=list(codec.model.cfg.lambdas),
        )

    return router
