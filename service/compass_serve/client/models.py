"""Typed views of the service's JSON, owned by the SDK (it never imports server code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layer:
    index: int
    width: int
    height: int
    byte_start: int
    byte_end: int  # inclusive, like HTTP ranges

    @property
    def length(self) -> int:
        return self.byte_end - self.byte_start + 1


@dataclass(frozen=True)
class Manifest:
    """An image's state and layer table (`GET /images/{id}/manifest`)."""

    id: str
    status: str                 # pending | ready | failed
    reason: str | None
    model: str
    weights_id: str
    quality: float
    width: int
    height: int
    size: int | None
    header_length: int | None
    layers: tuple[Layer, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            id=d["id"], status=d["status"], reason=d.get("reason"), model=d["model"],
            weights_id=d["weights_id"], quality=float(d["quality"]), width=int(d["width"]),
            height=int(d["height"]), size=d.get("size"), header_length=d.get("header_length"),
            layers=tuple(
                Layer(int(la["index"]), int(la["width"]), int(la["height"]),
                      int(la["byte_start"]), int(la["byte_end"]))
                for la in d.get("layers", [])
            ),
        )

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def layer_for_width(self, width: int) -> Layer:
        """The fewest layers that reach `width`: the first layer at least that wide, else the top."""
        for layer in self.layers:
            if layer.width >= width:
                return layer
        return self.layers[-1]

    def bytes_for_width(self, width: int) -> int:
        """How many leading bytes of the bitstream decode to `width` (header included)."""
        return self.layer_for_width(width).byte_end + 1


# What `upload` returns: the manifest of the uploaded image.
ImageInfo = Manifest


@dataclass(frozen=True)
class EncoderModel:
    """The model the server encodes new uploads with (`GET /model`): the quality range to offer."""

    name: str
    weights_id: str
    qualities: int              # `quality` takes 1..qualities; fractions interpolate
    default_quality: float      # what an upload that names no quality gets
    lambdas: tuple[float, ...]  # the rate-distortion trade-off each level was trained for

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderModel:
        return cls(name=d["name"], weights_id=d["weights_id"], qualities=int(d["qualities"]),
                   default_quality=float(d["default_quality"]),
                   lambdas=tuple(float(x) for x in d["lambdas"]))
