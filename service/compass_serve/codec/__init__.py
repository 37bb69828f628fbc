"""The COMPASS codec as a library: models, LIFF, the `.cmp` container, the model registry."""

from compass_serve.codec.bitstream import Bitstream, BitstreamError, CorruptLayer, LayerTable
from compass_serve.codec.coder import Codec, Decoded, ModelMismatch

__all__ = [
    "Bitstream",
    "BitstreamError",
    "Codec",
    "CorruptLayer",
    "Decoded",
    "LayerTable",
    "ModelMismatch",
]
