"""Python SDK: progressive, range-based fetching with local decoding (depends on the codec,
never on the server)."""

from compass_serve.client.clients import AsyncClient, Client
from compass_serve.client.errors import (
    CompassError,
    ModelMismatch,
    NotFound,
    NotReady,
    RequestRejected,
    ServerError,
    TransportError,
    TruncatedResponse,
)
from compass_serve.client.models import EncoderModel, ImageInfo, Layer, Manifest

__all__ = [
    "AsyncClient",
    "Client",
    "CompassError",
    "EncoderModel",
    "ImageInfo",
    "Layer",
    "Manifest",
    "ModelMismatch",
    "NotFound",
    "NotReady",
    "RequestRejected",
    "ServerError",
    "TransportError",
    "TruncatedResponse",
]
