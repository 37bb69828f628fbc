"""JSON bodies of the API (pydantic models, so the OpenAPI document describes them exactly)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from compass_serve.server.db import ImageRecord


class Layer(BaseModel):
    """One coded layer and where its bytes sit in the bitstream."""

    index: int = Field(description="0 is the base (smallest) layer")
    width: int
    height: int
    byte_start: int = Field(description="offset of the layer's first byte in the bitstream")
    byte_end: int = Field(
        description="offset of the layer's LAST byte, INCLUSIVE (like HTTP ranges): "
        "`Range: bytes={byte_start}-{byte_end}` fetches exactly this layer"
    )
    length: int = Field(description="byte_end - byte_start + 1")
    prefix_range: str = Field(
        description="`Range` value fetching the header and layers 0..index, i.e. a stream that "
        "decodes to this layer: `bytes=0-{byte_end}`"
    )


class Links(BaseModel):
    manifest: str
    bitstream: str
    image: str


class Manifest(BaseModel):
    """An image's state and, once ready, its layer table."""

    id: str
    status: Literal["pending", "ready", "failed"]
    reason: str | None = Field(None, description="why the image failed (status `failed`)")
    model: str
    weights_id: str = Field(description="first 8 bytes of the weights' sha256, hex")
    quality: float
    width: int = Field(description="full image width in pixels")
    height: int
    source_format: str
    source_bytes: int
    widths: list[int] | None = Field(None, description="requested layer widths")
    scales: list[float] | None = Field(None, description="requested layer scales")
    size: int | None = Field(None, description="bitstream length in bytes (when ready)")
    etag: str | None = Field(None, description="strong ETag of the bitstream (when ready)")
    header_length: int | None = Field(
        None, description="bytes 0..header_length-1 of the bitstream are the container header"
    )
    byte_ranges: Literal["inclusive"] = Field(
        "inclusive", description="`byte_end` values are inclusive, as in HTTP Range headers"
    )
    layers: list[Layer] = Field(default_factory=list, description="smallest first; empty unless ready")
    created_at: datetime
    updated_at: datetime
    links: Links


class UploadAccepted(BaseModel):
    """Answer to an upload that is queued for encoding."""

    id: str
    status: Literal["pending", "ready", "failed"]
    manifest: str = Field(description="poll this URL until status is `ready`")
    links: Links


class ImageSummary(BaseModel):
    id: str
    status: Literal["pending", "ready", "failed"]
    reason: str | None = None
    width: int
    height: int
    model: str
    quality: float
    size: int | None = None
    created_at: datetime
    links: Links


class ImagePage(BaseModel):
    items: list[ImageSummary]
    next_cursor: str | None = Field(None, description="pass as `cursor` for the next page")
    next: str | None = Field(None, description="URL of the next page")


class LayerCost(BaseModel):
    """What showing one layer's size costs: COMPASS's stream prefix against separate renditions."""

    index: int = Field(description="layer index, 0 = base")
    width: int
    height: int
    layer_bytes: int = Field(description="this layer's own bytes in the bitstream")
    prefix_bytes: int = Field(
        description="bytes 0..byte_end: the header and layers 0..index, all a client fetches to decode "
        "this layer (and, progressively, every smaller one on the way)"
    )
    jpeg_bytes: int | None = Field(None, description="a separate JPEG of the original at this size")
    webp_bytes: int | None = Field(None, description="a separate WebP of the original at this size")
    jpeg_bytes_cumulative: int | None = Field(
        None, description="separate JPEGs of layers 0..index: a progressive display built from renditions"
    )
    webp_bytes_cumulative: int | None = None


class Costs(BaseModel):
    """COMPASS bytes per layer against JPEG/WebP renditions of the same sizes (viewer comparison)."""

    id: str
    size: int = Field(description="whole bitstream length in bytes")
    header_length: int
    reference: str = Field(description="how the JPEG/WebP figures were made")
    output_quality: int | None = Field(
        None, description="JPEG/WebP quality of the comparison renditions (the server's output quality)"
    )
    recorded: bool = Field(
        description="false for images encoded before comparison sizes were recorded: the original "
        "pixels are gone, so the JPEG/WebP fields are null"
    )
    layers: list[LayerCost]


class EncoderModel(BaseModel):
    """The model new uploads are encoded with (older images name their own in the manifest)."""

    name: str
    weights_id: str = Field(description="8 bytes of the weights' sha256, hex, as stored in streams")
    qualities: int = Field(description="trained rate points: `quality` takes 1..qualities, "
                           "fractions interpolate between neighbours")
    default_quality: float = Field(description="the quality of an upload that names none")
    lambdas: list[float] = Field(description="the rate-distortion trade-off each quality was "
                                 "trained for (higher: more bytes, better fidelity)")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


def links(image_id: str) -> Links:
    base = f"/images/{image_id}"
    return Links(manifest=f"{base}/manifest", bitstream=f"{base}/bitstream", image=base)


def manifest(row: ImageRecord) -> Manifest:
    layers: list[Layer] = []
    header_length = None
    if row.header is not None:
        header_length = row.header["header_length"]
        for i, la in enumerate(row.header["layers"]):
            end = la["offset"] + la["length"] - 1
            layers.append(Layer(
                index=i, width=la["width"], height=la["height"], byte_start=la["offset"],
                byte_end=end, length=la["length"], prefix_range=f"bytes=0-{end}",
            ))
    return Manifest(
        id=row.id, status=row.status, reason=row.reason, model=row.model,  # type: ignore[arg-type]
        weights_id=row.weights_id, quality=row.quality, width=row.width, height=row.height,
        source_format=row.source_format, source_bytes=row.source_bytes, widths=row.widths,
        scales=row.scales, size=row.size, etag=f'"{row.etag}"' if row.etag else None,
        header_length=header_length, layers=layers, created_at=row.created_at,
        updated_at=row.updated_at, links=links(row.id),
    )


def summary(row: ImageRecord) -> ImageSummary:
    return ImageSummary(
        id=row.id, status=row.status, reason=row.reason, width=row.width,  # type: ignore[arg-type]
        height=row.height, model=row.model, quality=row.quality, size=row.size,
        created_at=row.created_at, links=links(row.id),
    )


REFERENCE = ("the uploaded image resized to each layer's size (Pillow bicubic, as the codec's ladder) and "
             "encoded by this server's rendition encoder, measured once at encode time")


def costs(row: ImageRecord) -> Costs:
    """The comparison table of a ready row (its header JSON holds the reference sizes)."""
    assert row.header is not None and row.size is not None
    ref = row.header.get("reference")
    sizes: dict[str, list[int]] = ref["bytes"] if ref else {}
    jpeg, webp = sizes.get("jpeg"), sizes.get("webp")
    layers: list[LayerCost] = []
    for i, la in enumerate(row.header["layers"]):
        layers.append(LayerCost(
            index=i, width=la["width"], height=la["height"], layer_bytes=la["length"],
            prefix_bytes=la["offset"] + la["length"],
            jpeg_bytes=jpeg[i] if jpeg else None, webp_bytes=webp[i] if webp else None,
            jpeg_bytes_cumulative=sum(jpeg[: i + 1]) if jpeg else None,
            webp_bytes_cumulative=sum(webp[: i + 1]) if webp else None,
        ))
    return Costs(id=row.id, size=row.size, header_length=row.header["header_length"], reference=REFERENCE,
                 output_quality=ref["quality"] if ref else None, recorded=ref is not None, layers=layers)
