"""The ``.cmp`` container of the multi-layer (spatially scalable) COMPASS codec.

A file is a header followed by one opaque payload per layer, smallest image first. The header
holds a layer table with absolute offsets, so any byte prefix that ends at a layer boundary is
itself decodable: this is what lets the server answer HTTP range requests with a smaller image.

Layout, version 1 (all integers big-endian)::

    offset size  field
    0      4     magic b"CMPS"
    4      1     format version (1)
    5      1     flags (0; reserved)
    6      1     model name length n (1..32), then n bytes ASCII model name
    .      8     weights id: first 8 bytes of the sha256 of the weights
    .      2     quality as u16 = round(quality * 100)
    .      2     full image width (u16, 1..65535)
    .      2     full image height
    .      1     layer count L (1..32)
    .      L*12  layer table: per layer width u16, height u16, payload length u32, payload CRC32 u32
    .      4     CRC32 of all header bytes before this field
    then the L payloads, in order, back to back.

Only the standard library is used so that the container can be inspected without torch.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_LAYERS",
    "MAX_MODEL_NAME",
    "Bitstream",
    "BitstreamError",
    "CorruptLayer",
    "Header",
    "LayerEntry",
    "LayerTable",
    "TruncatedHeader",
    "header_size",
    "pack",
    "pack_strings",
    "parse_header",
    "unpack_strings",
]

MAGIC = b"CMPS"
FORMAT_VERSION = 1
MAX_LAYERS = 32
MAX_MODEL_NAME = 32
WEIGHTS_ID_LEN = 8

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF

# magic, version, flags, model-name length
_PREAMBLE = struct.Struct(">4sBBB")
# quality, width, height, layer count (follows the model name and the weights id)
_FIXED = struct.Struct(">HHHB")
# per layer: width, height, payload length, payload CRC32
_LAYER = struct.Struct(">HHII")
_CRC = struct.Struct(">I")

_NAME_LEN_OFFSET = 6
_FIXED_BASE = _PREAMBLE.size  # the fixed block starts here + n + WEIGHTS_ID_LEN


class BitstreamError(ValueError):
    """Malformed or unsupported ``.cmp`` stream; the message says what and where."""


class TruncatedHeader(BitstreamError):
    """The input holds fewer bytes than the header needs."""


class CorruptLayer(BitstreamError):
    """A layer payload does not match the CRC32 stored in the layer table."""

    def __init__(self, layer: int, message: str) -> None:
        super().__init__(message)
        self.layer = layer

    def __reduce__(self) -> tuple[Any, ...]:
        # The default reduction would call CorruptLayer(message) and lose ``layer``; keep the
        # exception picklable because decoding may run in worker processes.
        return (type(self), (self.layer, str(self)))


@dataclass(frozen=True)
class LayerEntry:
    """One row of the layer table; ``offset`` is the absolute byte position in the file."""

    width: int
    height: int
    offset: int
    length: int
    crc32: int

    @property
    def end(self) -> int:
        """First byte after the payload (exclusive end)."""
        return self.offset + self.length


@dataclass(frozen=True)
class LayerTable(Sequence[LayerEntry]):
    """The layers of a stream, smallest first; behaves like a tuple of :class:`LayerEntry`."""

    layers: tuple[LayerEntry, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerEntry]:
        return iter(self.layers)

    @overload
    def __getitem__(self, index: int) -> LayerEntry: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LayerEntry, ...]: ...

    def __getitem__(self, index: int | slice) -> LayerEntry | tuple[LayerEntry, ...]:
        return self.layers[index]

    def prefix_length(self, k: int) -> int:
        """Bytes (header included) a client must fetch to decode layer ``k``."""
        if not 0 <= k < len(self.layers):
            raise IndexError(f"layer {k} out of range 0..{len(self.layers) - 1}")
        # Payloads are contiguous and start right after the header, so layer k's end is the
        # length of the prefix holding the header and layers 0..k.
        return self.layers[k].end

    def smallest_at_least(self, width: int) -> int:
        """Index of the first layer at least ``width`` wide, else the last (largest) layer."""
        for i, entry in enumerate(self.layers):
            if entry.width >= width:
                return i
        return len(self.layers) - 1

    def complete_layers(self, available: int) -> int:
        """How many leading layers are complete in a prefix of ``available`` bytes."""
        count = 0
        for entry in self.layers:
            if entry.end > available:
                break
            count += 1
        return count


@dataclass(frozen=True)
class Header:
    """Decoded header of a ``.cmp`` stream."""

    model: str
    weights_id: bytes
    quality: float
    width: int
    height: int
    table: LayerTable
    size: int

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable summary (used by the inspection endpoint and the CLI)."""
        return {
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
            "model": self.model,
            "weights_id": self.weights_id.hex(),
            "header_length": self.size,
            "layers": [
                {
                    "width": e.width,
                    "height": e.height,
                    "offset": e.offset,
                    "length": e.length,
                    "crc32": e.crc32,
                }
                for e in self.table
            ],
        }


def header_size(model: str, n_layers: int) -> int:
    """Header length in bytes for a model name and a layer count."""
    return _header_size(len(model.encode("ascii")), n_layers)


def _header_size(name_len: int, n_layers: int) -> int:
    return (
        _PREAMBLE.size
        + name_len
        + WEIGHTS_ID_LEN
        + _FIXED.size
        + n_layers * _LAYER.size
        + _CRC.size
    )


def _crc32(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & _U32_MAX


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    # bool is an int subclass; a True width is a caller bug, not a 1-pixel image.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _encode_model(model: str) -> bytes:
    if not isinstance(model, str):
        raise ValueError(f"model name must be a str, got {type(model).__name__}")
    if not model.isascii():
        raise ValueError(f"model name must be ASCII, got {model!r}")
    if not 1 <= len(model) <= MAX_MODEL_NAME:
        raise ValueError(
            f"model name must be 1..{MAX_MODEL_NAME} characters, got {len(model)} ({model!r})"
        )
    return model.encode("ascii")


def _encode_quality(quality: float) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int | float):
        raise ValueError(f"quality must be a number, got {type(quality).__name__}")
    if not math.isfinite(quality) or quality < 0:
        raise ValueError(f"quality must be a finite number >= 0, got {quality}")
    q = round(quality * 100)
    if q > _U16_MAX:
        raise ValueError(f"quality must be at most {_U16_MAX / 100}, got {quality}")
    return q


def pack(
    model: str,
    weights_id: bytes,
    quality: float,
    width: int,
    height: int,
    layers: Sequence[tuple[int, int, bytes]],
) -> bytes:
    """Build a complete ``.cmp`` file from ``(width, height, payload)`` layers, smallest first."""
    name = _encode_model(model)
    if not isinstance(weights_id, bytes | bytearray | memoryview):
        raise ValueError(f"weights_id must be bytes, got {type(weights_id).__name__}")
    weights = bytes(weights_id)
    if len(weights) != WEIGHTS_ID_LEN:
        raise ValueError(f"weights_id must be exactly {WEIGHTS_ID_LEN} bytes, got {len(weights)}")
    q = _encode_quality(quality)
    _check_int("image width", width, 1, _U16_MAX)
    _check_int("image height", height, 1, _U16_MAX)
    if not 1 <= len(layers) <= MAX_LAYERS:
        raise ValueError(f"need 1..{MAX_LAYERS} layers, got {len(layers)}")

    rows: list[bytes] = []
    payloads: list[bytes] = []
    for i, layer in enumerate(layers):
        if len(layer) != 3:
            raise ValueError(
                f"layer {i}: expected (width, height, payload), got {len(layer)} items"
            )
        lw, lh, payload = layer
        _check_int(f"layer {i} width", lw, 1, _U16_MAX)
        _check_int(f"layer {i} height", lh, 1, _U16_MAX)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"layer {i} payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        if len(data) > _U32_MAX:
            raise ValueError(f"layer {i} payload is {len(data)} bytes, at most {_U32_MAX} allowed")
        rows.append(_LAYER.pack(lw, lh, len(data), _crc32(data)))
        payloads.append(data)

    head = b"".join(
        [
            _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(name)),
            name,
            weights,
            _FIXED.pack(q, width, height, len(layers)),
            *rows,
        ]
    )
    return b"".join([head, _CRC.pack(_crc32(head)), *payloads])


def _need(view: memoryview, n: int, what: str) -> None:
    if len(view) < n:
        raise TruncatedHeader(f"truncated header: got {len(view)} bytes, need {n} {what}")


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and CRC-check the header; ``data`` needs to cover the header only."""
    view = memoryview(data).cast("B")
    avail = len(view)

    # Check whatever fixed fields are present before complaining about length, so that a short
    # non-CMPS input is reported as such rather than as merely truncated.
    head = bytes(view[: len(MAGIC)])
    if head != MAGIC[: len(head)]:
        raise BitstreamError(f"bad magic {head!r} at offset 0 (expected {MAGIC!r})")
    if avail > 4 and view[4] != FORMAT_VERSION:
        raise BitstreamError(
            f"unsupported format version {view[4]} at offset 4 (this reader supports "
            f"{FORMAT_VERSION})"
        )
    if avail > 5 and view[5] != 0:
        # Reserved flags may change the meaning of the stream in a later version: refuse.
        raise BitstreamError(f"unsupported flags 0x{view[5]:02x} at offset 5 (expected 0)")
    _need(view, _PREAMBLE.size, "to read the model-name length")

    name_len = view[_NAME_LEN_OFFSET]
    if not 1 <= name_len <= MAX_MODEL_NAME:
        raise BitstreamError(
            f"model-name length {name_len} at offset {_NAME_LEN_OFFSET} out of range "
            f"1..{MAX_MODEL_NAME}"
        )
    fixed_at = _FIXED_BASE + name_len + WEIGHTS_ID_LEN
    _need(view, fixed_at + _FIXED.size, "to read the layer count")
    q, width, height, n_layers = _FIXED.unpack_from(view, fixed_at)
    count_at = fixed_at + _FIXED.size - 1
    if not 1 <= n_layers <= MAX_LAYERS:
        raise BitstreamError(
            f"layer count {n_layers} at offset {count_at} out of range 1..{MAX_LAYERS}"
        )
    size = _header_size(name_len, n_layers)
    _need(view, size, f"for the header ({n_layers} layers, model-name length {name_len})")

    crc_at = size - _CRC.size
    (stored,) = _CRC.unpack_from(view, crc_at)
    computed = _crc32(view[:crc_at])
    if stored != computed:
        raise BitstreamError(
            f"header CRC mismatch at offset {crc_at}: stored 0x{stored:08x}, computed "
            f"0x{computed:08x} over bytes 0..{crc_at}"
        )

    # Semantic checks come after the CRC so that random corruption is reported as such.
    name_bytes = bytes(view[_PREAMBLE.size : _PREAMBLE.size + name_len])
    try:
        model = name_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise BitstreamError(
            f"model name {name_bytes!r} at offset {_PREAMBLE.size} is not ASCII"
        ) from None
    weights_id = bytes(view[_PREAMBLE.size + name_len : fixed_at])
    if width < 1 or height < 1:
        raise BitstreamError(
            f"image size {width}x{height} at offset {fixed_at + 2} must be at least 1x1"
        )

    entries: list[LayerEntry] = []
    offset = size
    table_at = fixed_at + _FIXED.size
    for i in range(n_layers):
        lw, lh, length, crc = _LAYER.unpack_from(view, table_at + i * _LAYER.size)
        if lw < 1 or lh < 1:
            raise BitstreamError(
                f"layer {i} size {lw}x{lh} at offset {table_at + i * _LAYER.size} must be at "
                "least 1x1"
            )
        entries.append(LayerEntry(lw, lh, offset, length, crc))
        offset += length

    return Header(
        model=model,
        weights_id=weights_id,
        quality=q / 100,
        width=width,
        height=height,
        table=LayerTable(tuple(entries)),
        size=size,
    )


@dataclass(frozen=True)
class Bitstream:
    """A parsed file or prefix: the header plus every layer payload that is fully present."""

    header: Header
    payloads: tuple[bytes, ...]
    truncated: bool

    @property
    def complete_layers(self) -> int:
        """Number of layers whose payload is present (and verified, unless verify=False)."""
        return len(self.payloads)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, *, verify: bool = True) -> Bitstream:
        """Parse a full file or any prefix covering the header.

        A partial trailing layer is dropped and ``truncated`` set; each kept layer is CRC-checked
        (``CorruptLayer``) when ``verify``. Zero complete layers is not an error here: whether that
        is acceptable is the decoder's call.
        """
        view = memoryview(data).cast("B")
        header = parse_header(view)
        table = header.table
        last_end = table[-1].end
        if len(view) > last_end:
            raise BitstreamError(
                f"{len(view) - last_end} trailing bytes after the last layer (stream ends at "
                f"offset {last_end}, got {len(view)} bytes)"
            )
        n = table.complete_layers(len(view))
        payloads: list[bytes] = []
        for i in range(n):
            entry = table[i]
            payload = bytes(view[entry.offset : entry.end])
            if verify:
                crc = _crc32(payload)
                if crc != entry.crc32:
                    raise CorruptLayer(
                        i,
                        f"layer {i} CRC mismatch (bytes {entry.offset}..{entry.end}): stored "
                        f"0x{entry.crc32:08x}, computed 0x{crc:08x}",
                    )
            payloads.append(payload)
        return cls(header=header, payloads=tuple(payloads), truncated=n < len(table))


# --- layer payload helper ---------------------------------------------------------------------

_VARINT_MAX_BYTES = 10  # enough for any 64-bit value; longer means garbage, not a real length


def _write_varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(_VARINT_MAX_BYTES):
        if pos + i >= len(data):
            raise BitstreamError(f"truncated varint at offset {pos}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            # Reject padded encodings so that every payload has exactly one byte form.
            if byte == 0 and i > 0:
                raise BitstreamError(f"non-minimal varint at offset {pos}")
            return value, pos + i + 1
    raise BitstreamError(f"varint at offset {pos} longer than {_VARINT_MAX_BYTES} bytes")


def pack_strings(strings: Sequence[bytes]) -> bytes:
    """Pack byte strings: varint count, varint lengths of all but the last, then the data."""
    out = bytearray()
    _write_varint(out, len(strings))
    for i, s in enumerate(strings):
        if not isinstance(s, bytes | bytearray | memoryview):
            raise ValueError(f"string {i} must be bytes, got {type(s).__name__}")
    # The last length is implied by the payload end, which saves a few bytes per layer.
    for s in strings[:-1]:
        _write_varint(out, len(s))
    for s in strings:
        out += s
    return bytes(out)


def unpack_strings(payload: bytes) -> list[bytes]:
    """Inverse of :func:`pack_strings`; ``BitstreamError`` on malformed input."""
    data = bytes(payload)
    count, pos = _read_varint(data, 0)
    if count == 0:
        if pos != len(data):
            raise BitstreamError(f"{len(data) - pos} bytes after an empty string list")
        return []
    # Every length takes at least one byte; bail out before looping over a garbage count.
    if count - 1 > len(data) - pos:
        raise BitstreamError(f"string count {count} impossible in a {len(data)}-byte payload")
    lengths: list[int] = []
    for _ in range(count - 1):
        length, pos = _read_varint(data, pos)
        lengths.append(length)
    total = sum(lengths)
    if total > len(data) - pos:
        raise BitstreamError(
            f"string lengths sum to {total} but only {len(data) - pos} data bytes follow "
            f"offset {pos}"
        )
    out: list[bytes] = []
    for length in lengths:
        out.append(data[pos : pos + length])
        pos += length
    out.append(data[pos:])
    return out
