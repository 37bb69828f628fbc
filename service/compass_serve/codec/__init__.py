"""The COMPASS codec as a library: models, LIFF, the `.cmp` container, the model registry.

The container (`bitstream`) needs only the standard library; the torch-based names are
imported on first use so that inspecting a stream does not load torch.
"""

from __future__ import annotations

from typing import Any

from compass_serve.codec.bitstream import Bitstream, BitstreamError, CorruptLayer, LayerTable

__all__ = ["Bitstream", "BitstreamError", "Codec", "CorruptLayer", "Decoded", "LayerTable",
           "ModelMismatch"]


def __getattr__(name: str) -> Any:
    if name in ("Codec", "Decoded", "ModelMismatch"):
        from compass_serve.codec import coder

        return getattr(coder, name)
    raise AttributeError(name)
