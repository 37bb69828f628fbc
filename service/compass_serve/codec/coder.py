"""Image <-> `.cmp` bytes: the codec's public face (no HTTP here).

    codec = Codec.load("lite")
    data = codec.encode(image, widths=[192, 384, 768], quality=3)
    decoded = codec.decode(data, width=500)   # any width; also any prefix of `data`
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from compass_serve.codec import bitstream as bs
from compass_serve.codec.ladder import Dim, make_ladder
from compass_serve.codec.model import Compass
from compass_serve.codec.refine import Refinement
from compass_serve.codec.registry import ModelInfo, load_model
from compass_serve.imageio import fit_width, resize, to_image, to_tensor


class ModelMismatch(bs.BitstreamError):
    """The stream was encoded with other weights than the decoder holds."""


class QualityError(ValueError):
    pass


@dataclass(frozen=True)
class Decoded:
    image: Image.Image
    layer: int                # index of the coded layer the image was made from
    complete_layers: int      # complete layers in the input
    truncated: bool           # the input ended mid-layer (the partial layer was ignored)
    header: bs.Header

    @property
    def note(self) -> str:
        """Human summary, e.g. for a CLI: says when a prefix was cut mid-layer."""
        total = len(self.header.table)
        msg = f"decoded from layer {self.layer} of {total}"
        if self.truncated:
            msg += f" (input ends inside layer {self.complete_layers}; highest complete layer used)"
        return msg


class Codec:
    """A COMPASS model paired with its identity (name + weights id) for the container."""

    def __init__(self, model: Compass, name: str, weights_id: bytes) -> None:
        self.model = model.eval()
        self.name = name
        self.weights_id = weights_id

    @classmethod
    def load(
        cls, name: str = "lite", store: Path | None = None, weights_id: bytes | None = None
    ) -> Codec:
        """The current weights of `name`, or the exact version `weights_id` (e.g. a stream's)."""
        model, info = load_model(name, store, weights_id)
        return cls.from_info(model, info)

    @classmethod
    def for_stream(cls, data: bytes | memoryview, store: Path | None = None) -> Codec:
        """The codec that can decode `data`: the model and weights version its header names."""
        header = bs.Bitstream.parse(data).header
        return cls.load(header.model, store, header.weights_id)

    @classmethod
    def from_info(cls, model: Compass, info: ModelInfo) -> Codec:
        return cls(model, info.name, info.weights_id)

    @property
    def qualities(self) -> int:
        return self.model.qualities

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_quality(self, quality: float | None) -> float:
        q = self.model.default_quality if quality is None else float(quality)
        if not (math.isfinite(q) and 1.0 <= q <= self.qualities):
            raise QualityError(f"quality {quality} is outside 1..{self.qualities} for {self.name}")
        return round(q, 2)  # the container stores hundredths

    # -- encode ------------------------------------------------------------------------------------
    def ladder(
        self, image: Image.Image, widths: Sequence[int] | None = None,
        scales: Sequence[float] | None = None,
    ) -> list[Dim]:
        return make_ladder(image.width, image.height, widths, scales)

    @torch.no_grad()  # not inference_mode: latent refinement takes gradients w.r.t. the latent
    def encode(
        self, image: Image.Image, *, widths: Sequence[int] | None = None,
        scales: Sequence[float] | None = None, quality: float | None = None,
        refine: int | Refinement = 0,
    ) -> bytes:
        """Encode an RGB image into a multi-layer `.cmp` stream (layers from `make_ladder`).

        `refine` spends encode time optimising each layer's latent for its own rate-distortion
        cost (see `codec.refine`); any decoder reads the result. A step count uses the default
        step size and temperatures; a `Refinement` sets every knob. 0 is the amortised encoder."""
        q = self.check_quality(quality)
        sizes = self.ladder(image, widths, scales)
        layers = [
            to_tensor(image if (w, h) == image.size else resize(image, w, h)).to(self.device)
            for w, h in sizes
        ]
        plan = refine if isinstance(refine, Refinement) else Refinement(steps=refine)
        strings = self.model.compress(layers, q, plan if plan.steps else None)
        return bs.pack(
            self.name, self.weights_id, q, image.width, image.height,
            [(w, h, bs.pack_strings(s)) for (w, h), s in zip(sizes, strings, strict=True)],
        )

    # -- decode ------------------------------------------------------------------------------------
    def check_stream(self, header: bs.Header) -> None:
        if header.model != self.name or header.weights_id != self.weights_id:
            raise ModelMismatch(
                f"stream was encoded with model {header.model!r} (weights "
                f"{header.weights_id.hex()}); this decoder holds {self.name!r} "
                f"(weights {self.weights_id.hex()})"
            )

    @torch.inference_mode()
    def decode_layers(self, stream: bs.Bitstream, upto: int | None = None, *,
                      top_only: bool = False) -> list[torch.Tensor]:
        """Reconstructions (unclamped) of layers 0..upto from a parsed stream, as shown
        (`top_only`: [layer upto] alone, see `Compass.decompress`)."""
        self.check_stream(stream.header)
        n = stream.complete_layers if upto is None else upto + 1
        if n < 1 or n > stream.complete_layers:
            raise bs.BitstreamError(
                f"layer {n - 1} is not complete in the input "
                f"({stream.complete_layers} complete layer(s))"
            )
        table = stream.header.table
        strings = [bs.unpack_strings(p) for p in stream.payloads[:n]]
        sizes = [(e.height, e.width) for e in list(table)[:n]]
        quality = stream.header.quality
        return self.model.decompress(strings, sizes, quality, top_only=top_only)

    @torch.inference_mode()
    def decode(
        self, data: bytes | memoryview, *, width: int | None = None, layer: int | None = None
    ) -> Decoded:
        """Decode to `width` pixels (aspect kept) or to coded `layer`; default: the top layer.

        Width rules: the smallest complete layer at least that wide, resized down with
        antialiasing; wider than every complete layer, LIFF predicts from the top one.
        """
        if width is not None and layer is not None:
            raise ValueError("give a width or a layer, not both")
        stream = bs.Bitstream.parse(data)
        header = stream.header
        self.check_stream(header)
        complete = stream.complete_layers
        if complete == 0:
            raise bs.BitstreamError(
                f"no complete layer: the base layer needs the first "
                f"{header.table.prefix_length(0)} bytes, got {len(data)}"
            )
        table = header.table
        if layer is not None:
            if not 0 <= layer < len(table):
                raise ValueError(f"layer {layer} is outside 0..{len(table) - 1}")
            k = min(layer, complete - 1)
        elif width is not None:
            if width < 1:
                raise ValueError(f"width must be at least 1, got {width}")
            k = min(table.smallest_at_least(width), complete - 1)
        else:
            k = complete - 1
        (x,) = self.decode_layers(stream, k, top_only=True)
        entry = table[k]
        if width is not None:
            tw, th = fit_width(header.width, header.height, width)
            if tw > entry.width:
                x = self.model.upscale(x, (th, tw))
                img = to_image(x)
            else:
                img = to_image(x)
                if (tw, th) != img.size:
                    img = resize(img, tw, th)
        else:
            img = to_image(x)
        # "Truncated" means the input stops inside a layer, not at a layer boundary.
        boundary = table[complete - 1].end
        return Decoded(img, k, complete, len(data) > boundary, header)
