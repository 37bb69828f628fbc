"""Server building blocks without HTTP: atomic blobs, LRU cache, ranges, negotiation, settings."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from compass_serve.server.httputil import RangeFileResponse, etag_matches, negotiate
from compass_serve.server.renditions import RenditionCache
from compass_serve.server.service import image_id_for, layer_for_width
from compass_serve.server.settings import Settings
from compass_serve.server.storage import BlobNotFound, BlobStore, LocalBlobStore

ALL = ("png", "jpeg", "webp", "avif")


def test_blob_store_round_trip_and_protocol(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    assert isinstance(store, BlobStore)
    store.put("images/a.cmp", b"0123456789")
    assert store.get("images/a.cmp") == b"0123456789"
    assert store.read_range("images/a.cmp", 2, 5) == b"234"
    assert store.size("images/a.cmp") == 10 and store.size("images/b.cmp") is None
    assert list(store.keys("images/")) == ["images/a.cmp"]
    assert store.delete("images/a.cmp") and not store.delete("images/a.cmp")
    with pytest.raises(BlobNotFound):
        store.get("images/a.cmp")
    for bad in ("../x", "images/../../x", "/abs", "a//b", ".tmp/x"):
        with pytest.raises(ValueError):
            store.put(bad, b"")


def test_blob_write_interrupted_before_rename_leaves_nothing(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalBlobStore(tmp_path)
    store.put("images/a.cmp", b"old")

    def crash(*_a: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put("images/a.cmp", b"new bytes")
    with pytest.raises(OSError):
        store.put("images/b.cmp", b"new bytes")
    monkeypatch.undo()
    # Readers see the old blob whole, never a prefix of the new one; no new blob appeared.
    assert store.get("images/a.cmp") == b"old" and store.size("images/b.cmp") is None
    assert not list(store.tmp.iterdir())  # failed writes clean up their temporary file
    # A hard crash cannot clean up: recover() removes what it left.
    (store.tmp / "images-b.cmp.1.part").write_bytes(b"new by")
    assert store.recover() == 1 and not list(store.tmp.iterdir())


def test_rendition_cache_is_a_byte_capped_lru(tmp_path: Path) -> None:
    cache = RenditionCache(tmp_path, max_bytes=250)
    for w in (1, 2):
        cache.put("ab" * 16, w, "png", bytes(100))
    assert cache.get("ab" * 16, 1, "png") == bytes(100)  # 1 is now the most recent
    cache.put("ab" * 16, 3, "png", bytes(100))  # evicts 2 (least recently used)
    assert cache.get("ab" * 16, 2, "png") is None
    assert cache.get("ab" * 16, 1, "png") is not None and cache.get("ab" * 16, 3, "png") is not None
    assert cache.total_bytes == 200
    cache.put("cd" * 16, 1, "png", bytes(1000))  # larger than the cap: not cached
    assert cache.get("cd" * 16, 1, "png") is None
    # Rebuilt from disk; renditions of images no longer kept are dropped.
    again = RenditionCache(tmp_path, max_bytes=250)
    again.load({"ab" * 16})
    assert len(again) == 2 and again.total_bytes == 200
    again.load(set())
    assert len(again) == 0 and not list(tmp_path.glob("ab/*"))


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-9", [(0, 10)]),
    ("bytes=-5", [(95, 100)]),
    ("bytes=90-", [(90, 100)]),
    ("bytes=90-200", [(90, 100)]),
    ("bytes=0-1, 5-6", [(0, 2), (5, 7)]),
    ("bytes=0-1,200-300", [(0, 2)]),  # the unsatisfiable range is dropped, not the request
    ("bytes=5-2", []),  # invalid: ignored (full response)
    ("bytes=x-2", []),
    ("pages=1-2", []),
    ("bytes", []),
    ("bytes=100-", None),  # unsatisfiable: 416
    ("bytes=-0", None),
    ("bytes=100-200,300-", None),
])
def test_range_evaluation(header: str, expected: list[tuple[int, int]] | None) -> None:
    assert RangeFileResponse.evaluate(header, 100) == expected


def test_etag_matching() -> None:
    assert etag_matches('"a"', '"a"') and etag_matches('W/"a"', '"a"') and etag_matches("*", '"a"')
    assert etag_matches('"b", "a"', '"a"') and not etag_matches('"b"', '"a"')
    assert not etag_matches(None, '"a"') and not etag_matches("", '"a"')


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "webp"),
    ("image/png", "png"),
    ("image/png;q=0.4, image/jpeg;q=0.6", "jpeg"),
    ("image/*", "webp"),
    ("image/*;q=0.1, image/png;q=0.2", "png"),
    ("text/html", None),
    ("image/webp;q=0, image/avif;q=0, image/jpeg;q=0, image/*", "png"),
    ("IMAGE/PNG", "png"),
    ("image/png;q=abc, image/jpeg", "jpeg"),
])
def test_negotiation(accept: str | None, expected: str | None) -> None:
    assert negotiate(accept, ALL) == expected


def test_negotiation_respects_available_formats() -> None:
    assert negotiate("image/avif, image/webp;q=0.5", ("png", "jpeg")) is None
    assert negotiate("*/*", ("png", "jpeg")) == "jpeg"


def test_ids_are_deterministic() -> None:
    a = image_id_for("00" * 32, "lite", "ab" * 8, 3.0, [1, 2], None)
    assert a == image_id_for("00" * 32, "lite", "ab" * 8, 3.0, [1, 2], None)
    assert len({a, image_id_for("00" * 32, "lite", "ab" * 8, 2.0, [1, 2], None),
                image_id_for("00" * 32, "lite", "cd" * 8, 3.0, [1, 2], None),
                image_id_for("00" * 32, "lite", "ab" * 8, 3.0, None, [0.5, 1.0]),
                image_id_for("11" * 32, "lite", "ab" * 8, 3.0, [1, 2], None),
                image_id_for("00" * 32, "lite", "ab" * 8, 3.0, [1, 2], None, 30)}) == 6
    # the default effort leaves ids minted before the setting existed unchanged
    assert a == image_id_for("00" * 32, "lite", "ab" * 8, 3.0, [1, 2], None, 0)


def test_layer_choice() -> None:
    layers = [{"width": 30}, {"width": 60}, {"width": 120}]
    assert [layer_for_width(layers, w) for w in (1, 30, 31, 60, 61, 120, 500)] == [0, 0, 1, 1, 2, 2, 2]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COMPASS_PORT", "9123")
    monkeypatch.setenv("COMPASS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("COMPASS_FORMATS", "png, jpeg")
    monkeypatch.setenv("COMPASS_API_KEY", "k-9f3e1")
    s = Settings()
    assert (s.host, s.port, s.data_dir) == ("127.0.0.1", 9123, tmp_path)
    assert s.formats == frozenset({"PNG", "JPEG"})
    assert s.api_key is not None and s.api_key.get_secret_value() == "k-9f3e1" and "9f3e1" not in repr(s)
    assert s.db_url == f"sqlite:///{(tmp_path / 'compass.db').resolve()}"
    monkeypatch.delenv("COMPASS_PORT")
    assert Settings().port == 8000 and Settings(data_dir=Path("x")).data_dir == Path("x")


@pytest.mark.parametrize(("method", "http_range", "status", "expected"), [
    ("GET", None, 200, bytes(range(100))),
    ("GET", "bytes=10-19", 206, bytes(range(10, 20))),
    ("GET", "bytes=0-1,90-", 206, None),  # multipart: both parts checked below
    ("HEAD", None, 200, b""),
])
def test_an_opened_file_response_outlives_the_files_deletion(
    tmp_path: Path, method: str, http_range: str | None, status: int, expected: bytes | None
) -> None:
    """The bitstream route opens the file before returning, so a DELETE between the route and
    the send cannot cut the response short (FileResponse opens its path only when it sends)."""
    path = tmp_path / "stream.bin"
    path.write_bytes(bytes(range(100)))
    response = RangeFileResponse.opened(path, media_type="application/octet-stream")
    path.unlink()  # the DELETE, after the route returned
    headers = [(b"range", http_range.encode())] if http_range else []
    scope = {"type": "http", "method": method, "headers": headers, "path": "/"}
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    asyncio.run(response(scope, receive, send))
    assert sent[0]["status"] == status
    body = b"".join(m.get("body", b"") for m in sent[1:])  # type: ignore[misc]
    if expected is None:
        assert dict(sent[0]["headers"])[b"content-type"].startswith(  # type: ignore[call-overload]
            b"multipart/byteranges")
        assert bytes(range(2)) in body and bytes(range(90, 100)) in body
    else:
        assert body == expected
    assert response._file is not None and response._file.closed


def test_an_opened_file_response_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RangeFileResponse.opened(tmp_path / "gone.bin")
