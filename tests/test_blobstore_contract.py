"""One contract for every blob store: the local directory and S3 (against moto's S3 server)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from compass_serve.server.s3store import S3BlobStore
from compass_serve.server.settings import Settings
from compass_serve.server.storage import BlobNotFound, BlobStore, LocalBlobStore, open_store

BreakWrites = Callable[[], contextlib.AbstractContextManager[None]]


def s3_settings(endpoint: str, **kw: Any) -> Settings:
    values: dict[str, Any] = dict(blob_store="s3", s3_endpoint_url=endpoint,
                                  s3_bucket=f"b-{uuid.uuid4().hex[:10]}", s3_access_key_id="test",
                                  s3_secret_access_key="test")
    values.update(kw)
    return Settings(**values)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[BlobStore, BreakWrites]]:
    """A fresh store, and a way to make its writes die halfway (a crash or a cut connection)."""
    if request.param == "local":
        store: BlobStore = LocalBlobStore(tmp_path)

        @contextlib.contextmanager
        def break_local() -> Iterator[None]:
            with pytest.MonkeyPatch.context() as mp:
                def crash(*_a: object) -> None:
                    raise OSError("power cut before the rename")

                mp.setattr(os, "replace", crash)
                yield

        yield store, break_local
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = open_store(s3_settings(endpoint, s3_prefix="tenant/"))
    assert isinstance(s3, S3BlobStore)

    @contextlib.contextmanager
    def break_s3() -> Iterator[None]:
        # The connection drops while the PUT is being sent. (Bytes that do arrive damaged are
        # refused by S3 / MinIO through the Content-MD5 the store sends; moto does not check it,
        # so that half is covered by test_s3_put_sends_content_md5.)
        def cut(request: Any, **_kw: Any) -> None:
            raise ConnectionClosedError(endpoint_url=request.url)

        s3.client.meta.events.register_first("before-send.s3.PutObject", cut)
        try:
            yield
        finally:
            s3.client.meta.events.unregister("before-send.s3.PutObject", cut)

    yield s3, break_s3


def test_round_trip(backend: tuple[BlobStore, BreakWrites]) -> None:
    store, _ = backend
    assert isinstance(store, BlobStore)
    store.put("images/a.cmp", b"0123456789")
    store.put("sources/x", b"src")
    assert store.get("images/a.cmp") == b"0123456789"
    assert store.size("images/a.cmp") == 10 and store.size("images/b.cmp") is None
    assert list(store.keys("images/")) == ["images/a.cmp"]
    assert sorted(store.keys()) == ["images/a.cmp", "sources/x"]
    store.put("images/a.cmp", b"new")  # overwrite replaces the whole blob
    assert store.get("images/a.cmp") == b"new" and store.size("images/a.cmp") == 3
    assert store.delete("images/a.cmp") and not store.delete("images/a.cmp")
    with pytest.raises(BlobNotFound):
        store.get("images/a.cmp")
    assert list(store.keys("images/")) == []


def test_range_reads(backend: tuple[BlobStore, BreakWrites]) -> None:
    store, _ = backend
    data = bytes(range(256)) * 40
    store.put("images/r.cmp", data)
    assert store.read_range("images/r.cmp", 0, 1) == data[:1]
    assert store.read_range("images/r.cmp", 100, 2000) == data[100:2000]
    assert store.read_range("images/r.cmp", 10_000, 20_000) == data[10_000:]  # end clipped
    assert store.read_range("images/r.cmp", 20_000, 20_010) == b""  # past the end
    assert store.read_range("images/r.cmp", 5, 5) == b""
    with pytest.raises(BlobNotFound):
        store.read_range("images/missing.cmp", 0, 10)


def test_invalid_keys_are_refused(backend: tuple[BlobStore, BreakWrites]) -> None:
    store, _ = backend
    for bad in ("../x", "images/../../x", "/abs", "a//b", ".tmp/x", ""):
        with pytest.raises(ValueError):
            store.put(bad, b"")


def test_interrupted_write_leaves_old_blob_or_nothing(backend: tuple[BlobStore, BreakWrites]) -> None:
    store, break_writes = backend
    store.put("images/a.cmp", b"old bytes")
    payload = os.urandom(64 * 1024)
    with break_writes():
        with pytest.raises(Exception):  # noqa: B017 - OSError locally, ConnectionClosedError on S3
            store.put("images/a.cmp", payload)
        with pytest.raises(Exception):  # noqa: B017
            store.put("images/b.cmp", payload)
    assert store.get("images/a.cmp") == b"old bytes"  # whole old blob, never a prefix of the new
    assert store.size("images/b.cmp") is None  # no half blob appeared
    assert list(store.keys("images/")) == ["images/a.cmp"]
    store.recover()  # and after start-up cleanup, still exactly the old blob
    assert list(store.keys()) == ["images/a.cmp"] and store.get("images/a.cmp") == b"old bytes"


def test_s3_recover_aborts_leftover_multipart_uploads(s3_endpoint: str) -> None:
    store = open_store(s3_settings(s3_endpoint, s3_prefix="p/"))
    assert isinstance(store, S3BlobStore)
    store.client.create_multipart_upload(Bucket=store.bucket, Key="p/images/big.cmp")
    store.client.create_multipart_upload(Bucket=store.bucket, Key="other/images/big.cmp")  # not ours
    assert store.recover() == 1
    left = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other/images/big.cmp"]


def test_s3_prefix_isolates_deployments(s3_endpoint: str) -> None:
    settings = s3_settings(s3_endpoint, s3_prefix="one/")
    one = open_store(settings)
    two = open_store(settings.model_copy(update={"s3_prefix": "two/"}))
    one.put("images/a.cmp", b"1")
    two.put("images/a.cmp", b"22")
    assert one.get("images/a.cmp") == b"1" and list(two.keys()) == ["images/a.cmp"]
    assert one.size("images/a.cmp") == 1 and two.size("images/a.cmp") == 2
    assert isinstance(one, S3BlobStore) and one.local_path("images/a.cmp") is None
    assert "one/images/a.cmp" in one.presigned_url("images/a.cmp", 60)


def test_s3_put_sends_content_md5(s3_endpoint: str) -> None:
    """S3 refuses a body that does not match its Content-MD5: damaged bytes are never stored."""
    store = open_store(s3_settings(s3_endpoint))
    assert isinstance(store, S3BlobStore)
    seen: list[tuple[str | None, bytes]] = []

    def record(request: Any, **_kw: Any) -> None:
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        seen.append((request.headers.get("Content-MD5"), body))
        if not isinstance(request.body, bytes):
            request.body.seek(0)

    store.client.meta.events.register("before-send.s3.PutObject", record)
    store.put("images/m.cmp", b"payload")
    (md5, body), = seen
    assert body == b"payload"
    assert md5 is not None and base64.b64decode(md5) == hashlib.md5(b"payload").digest()
