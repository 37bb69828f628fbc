"""Tests of the ``.cmp`` container (pure Python, no model needed)."""

from __future__ import annotations

import pickle
import struct
import zlib

import pytest

from compass_serve.codec.bitstream import (
    FORMAT_VERSION,
    MAGIC,
    MAX_LAYERS,
    Bitstream,
    BitstreamError,
    CorruptLayer,
    Header,
    LayerEntry,
    LayerTable,
    TruncatedHeader,
    header_size,
    pack,
    pack_strings,
    parse_header,
    unpack_strings,
)

WEIGHTS = bytes(range(1, 9))
# Distinct, differently sized payloads so that off-by-one offsets would show up.
PAYLOADS = (b"\x00\x01small", bytes(range(40)), b"L" * 23)
LAYERS = [(48, 32, PAYLOADS[0]), (96, 64, PAYLOADS[1]), (192, 128, PAYLOADS[2])]


@pytest.fixture(scope="module")
def blob() -> bytes:
    return pack("lite", WEIGHTS, 0.0183, 192, 128, LAYERS)


def _flip(data: bytes, pos: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[pos] ^= mask
    return bytes(out)


def _with_header_crc(head: bytes) -> bytes:
    """Re-seal a hand-edited header (without CRC field) so only the edited field is wrong."""
    return head + struct.pack(">I", zlib.crc32(head))


# --- pack / parse ------------------------------------------------------------------------------


def test_header_size_lite_three_layers(blob: bytes) -> None:
    assert header_size("lite", 3) == 66
    assert parse_header(blob).size == 66
    assert len(blob) == 66 + sum(len(p) for p in PAYLOADS)


def test_round_trip(blob: bytes) -> None:
    bs = Bitstream.parse(blob)
    h = bs.header
    assert isinstance(h, Header)
    assert (h.model, h.weights_id, h.width, h.height) == ("lite", WEIGHTS, 192, 128)
    assert h.quality == pytest.approx(0.02)  # stored in 1/100 steps
    assert bs.payloads == PAYLOADS
    assert bs.complete_layers == 3
    assert not bs.truncated
    assert [(e.width, e.height) for e in h.table] == [(w, ht) for w, ht, _ in LAYERS]
    offsets = [e.offset for e in h.table]
    assert offsets == [66, 66 + len(PAYLOADS[0]), 66 + len(PAYLOADS[0]) + len(PAYLOADS[1])]
    for entry, payload in zip(h.table, PAYLOADS, strict=True):
        assert blob[entry.offset : entry.end] == payload
        assert entry.crc32 == zlib.crc32(payload)


def test_round_trip_memoryview_and_bytearray(blob: bytes) -> None:
    assert Bitstream.parse(memoryview(blob)) == Bitstream.parse(blob)
    assert Bitstream.parse(bytearray(blob)) == Bitstream.parse(blob)


@pytest.mark.parametrize("quality", [0.0, 1.0, 12.34, 655.35])
def test_quality_round_trip(quality: float) -> None:
    data = pack("m", WEIGHTS, quality, 1, 1, [(1, 1, b"x")])
    assert parse_header(data).quality == pytest.approx(quality)


def test_single_layer_empty_payload_and_long_name() -> None:
    name = "n" * 32
    data = pack(name, WEIGHTS, 1.0, 65535, 65535, [(65535, 65535, b"")])
    bs = Bitstream.parse(data)
    assert bs.header.model == name
    assert bs.payloads == (b"",)
    assert len(data) == header_size(name, 1)


def test_max_layers() -> None:
    layers = [(i + 1, i + 1, bytes([i])) for i in range(MAX_LAYERS)]
    bs = Bitstream.parse(pack("m", WEIGHTS, 1.0, 32, 32, layers))
    assert bs.payloads == tuple(bytes([i]) for i in range(MAX_LAYERS))


def test_to_json(blob: bytes) -> None:
    js = parse_header(blob).to_json()
    assert set(js) == {
        "width",
        "height",
        "quality",
        "model",
        "weights_id",
        "header_length",
        "layers",
    }
    assert js["weights_id"] == WEIGHTS.hex()
    assert js["header_length"] == 66
    assert js["model"] == "lite"
    assert len(js["layers"]) == 3
    for row in js["layers"]:
        assert set(row) == {"width", "height", "offset", "length", "crc32"}
    assert js["layers"][1]["offset"] == 66 + len(PAYLOADS[0])


# --- prefixes ----------------------------------------------------------------------------------


def test_every_prefix(blob: bytes) -> None:
    ends = [66 + sum(len(p) for p in PAYLOADS[: k + 1]) for k in range(3)]
    for n in range(len(blob) + 1):
        prefix = blob[:n]
        if n < 66:
            with pytest.raises(TruncatedHeader):
                parse_header(prefix)
            with pytest.raises(TruncatedHeader):
                Bitstream.parse(prefix)
            continue
        bs = Bitstream.parse(prefix)
        complete = sum(1 for e in ends if e <= n)
        assert bs.complete_layers == complete, n
        assert bs.payloads == PAYLOADS[:complete]
        assert bs.truncated == (complete < 3)
        assert bs.header.table.complete_layers(n) == complete


def test_truncated_messages_say_how_many_bytes(blob: bytes) -> None:
    with pytest.raises(TruncatedHeader, match="need 7 "):
        parse_header(blob[:5])
    # name length 4 is known at 7 bytes: the layer count is at offset 7+4+8+6 = 25
    with pytest.raises(TruncatedHeader, match="need 26 "):
        parse_header(blob[:10])
    with pytest.raises(TruncatedHeader, match="need 66 "):
        parse_header(blob[:40])


def test_trailing_bytes_rejected(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="trailing"):
        Bitstream.parse(blob + b"\x00")


# --- corruption --------------------------------------------------------------------------------


def test_payload_byte_flip_names_layer(blob: bytes) -> None:
    table = parse_header(blob).table
    for k, entry in enumerate(table):
        for pos in range(entry.offset, entry.end):
            with pytest.raises(CorruptLayer) as info:
                Bitstream.parse(_flip(blob, pos))
            assert info.value.layer == k
            assert f"layer {k}" in str(info.value)
        # Unverified parse hands the damaged bytes to the caller instead.
        assert len(Bitstream.parse(_flip(blob, entry.offset), verify=False).payloads) == 3


def test_corrupt_partial_layer_is_not_checked(blob: bytes) -> None:
    # The last layer is cut off, so damage inside it cannot be seen and must not raise.
    last = parse_header(blob).table[2]
    bs = Bitstream.parse(_flip(blob, last.offset)[: last.end - 1])
    assert bs.complete_layers == 2 and bs.truncated


def test_corrupt_layer_pickles() -> None:
    err = pickle.loads(pickle.dumps(CorruptLayer(2, "layer 2 broken")))
    assert err.layer == 2 and str(err) == "layer 2 broken"


@pytest.mark.parametrize("mask", [0xFF, 0x01, 0x80])
def test_header_byte_flip(blob: bytes, mask: int) -> None:
    for pos in range(66):
        with pytest.raises(BitstreamError):
            Bitstream.parse(_flip(blob, pos, mask))


def test_header_crc_message(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="header CRC mismatch"):
        parse_header(_flip(blob, 20))


def test_bad_magic(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="bad magic") as info:
        parse_header(b"PNG\x00" + blob[4:])
    assert not isinstance(info.value, TruncatedHeader)
    # Even a short non-CMPS input is reported as not ours rather than as truncated.
    with pytest.raises(BitstreamError, match="bad magic") as info:
        parse_header(b"GIF")
    assert not isinstance(info.value, TruncatedHeader)


def test_bad_version(blob: bytes) -> None:
    data = blob[:4] + bytes([FORMAT_VERSION + 1]) + blob[5:]
    with pytest.raises(BitstreamError, match=r"unsupported format version 2 at offset 4"):
        parse_header(data)


def test_bad_flags(blob: bytes) -> None:
    with pytest.raises(BitstreamError, match="flags"):
        parse_header(blob[:5] + b"\x01" + blob[6:])


def test_semantic_errors_behind_valid_crc(blob: bytes) -> None:
    head = bytearray(blob[:62])
    head[7] = 0xE9  # non-ASCII model name
    with pytest.raises(BitstreamError, match="ASCII"):
        parse_header(_with_header_crc(bytes(head)))
    head = bytearray(blob[:62])
    head[26:28] = b"\x00\x00"  # layer 0 width 0
    with pytest.raises(BitstreamError, match="layer 0"):
        parse_header(_with_header_crc(bytes(head)))
    head = bytearray(blob[:62])
    head[25] = 0  # layer count 0
    with pytest.raises(BitstreamError, match="layer count 0"):
        parse_header(bytes(head))
    head = bytearray(blob[:62])
    head[6] = 0  # empty model name
    with pytest.raises(BitstreamError, match="model-name length 0"):
        parse_header(bytes(head))


def test_empty_input() -> None:
    with pytest.raises(TruncatedHeader):
        parse_header(b"")
    assert MAGIC == b"CMPS"


# --- pack validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": ""}, "model name"),
        ({"model": "x" * 33}, "model name"),
        ({"model": "modèle"}, "ASCII"),
        ({"weights_id": b"1234567"}, "weights_id"),
        ({"weights_id": b"123456789"}, "weights_id"),
        ({"quality": -0.5}, "quality"),
        ({"quality": 655.36}, "quality"),
        ({"quality": float("nan")}, "quality"),
        ({"width": 0}, "image width"),
        ({"height": 65536}, "image height"),
        ({"width": 1.5}, "image width"),
        ({"layers": []}, "layers"),
        ({"layers": [(1, 1, b"")] * (MAX_LAYERS + 1)}, "layers"),
        ({"layers": [(0, 1, b"")]}, "layer 0 width"),
        ({"layers": [(1, 1, b""), (1, 70000, b"")]}, "layer 1 height"),
        ({"layers": [(1, 1, "text")]}, "layer 0 payload"),
        ({"layers": [(1, 1)]}, "layer 0"),
    ],
)
def test_pack_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "model": "lite",
        "weights_id": WEIGHTS,
        "quality": 1.0,
        "width": 10,
        "height": 10,
        "layers": [(5, 5, b"a"), (10, 10, b"b")],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pack(**args)  # type: ignore[arg-type]


def test_pack_does_not_require_increasing_layers() -> None:
    data = pack("m", WEIGHTS, 1.0, 10, 10, [(10, 10, b"a"), (5, 5, b"b")])
    assert Bitstream.parse(data).payloads == (b"a", b"b")


# --- LayerTable --------------------------------------------------------------------------------


def _table() -> LayerTable:
    return LayerTable(
        (
            LayerEntry(100, 50, 66, 10, 0),
            LayerEntry(200, 100, 76, 20, 0),
            LayerEntry(400, 200, 96, 30, 0),
        )
    )


def test_table_sequence() -> None:
    t = _table()
    assert len(t) == 3
    assert [e.width for e in t] == [100, 200, 400]
    assert t[-1].end == 126
    assert t[1:] == t.layers[1:]


def test_prefix_length() -> None:
    t = _table()
    assert [t.prefix_length(k) for k in range(3)] == [76, 96, 126]
    with pytest.raises(IndexError):
        t.prefix_length(3)
    with pytest.raises(IndexError):
        t.prefix_length(-1)


@pytest.mark.parametrize(
    ("width", "index"), [(0, 0), (100, 0), (101, 1), (200, 1), (201, 2), (400, 2), (10_000, 2)]
)
def test_smallest_at_least(width: int, index: int) -> None:
    assert _table().smallest_at_least(width) == index


@pytest.mark.parametrize(
    ("available", "count"),
    [(0, 0), (66, 0), (75, 0), (76, 1), (95, 1), (96, 2), (126, 3), (999, 3)],
)
def test_complete_layers(available: int, count: int) -> None:
    assert _table().complete_layers(available) == count


# --- pack_strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strings",
    [
        [],
        [b""],
        [b"only"],
        [b"", b""],
        [b"a", b"", b"bc"],
        [b"x" * 300, b"y" * 20_000, b""],
        [bytes(range(256)), b"\x00", b"tail"],
    ],
)
def test_pack_strings_round_trip(strings: list[bytes]) -> None:
    assert unpack_strings(pack_strings(strings)) == strings


def test_pack_strings_layout() -> None:
    # count 3, lengths of the first two (300 -> LEB128 ac 02, 1), then the data
    packed = pack_strings([b"a" * 300, b"b", b"cc"])
    assert packed[:4] == b"\x03\xac\x02\x01"
    assert packed[4:] == b"a" * 300 + b"bcc"
    assert pack_strings([b"solo"]) == b"\x01solo"
    assert pack_strings([]) == b"\x00"


@pytest.mark.parametrize(
    "payload",
    [
        b"",  # no count
        b"\x80",  # truncated varint
        b"\x00extra",  # data after an empty list
        b"\x02\x05ab",  # first string claims more bytes than present
        b"\x03\x01",  # missing a length
        b"\xff" * 11,  # over-long varint
        b"\x80\x00",  # non-minimal varint
        b"\xff\xff\xff\xff\x0f",  # absurd count
    ],
)
def test_unpack_strings_malformed(payload: bytes) -> None:
    with pytest.raises(BitstreamError):
        unpack_strings(payload)
