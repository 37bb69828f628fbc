"""The HTTP service on the S3 blob store (moto's S3 server on loopback stands in for S3 / MinIO)."""

from __future__ import annotations

from pathlib import Path

import httpx

from compass_serve.server.s3store import S3BlobStore
from tests.conftest import photo
from tests.server_harness import LiveServer, png_bytes, test_settings
from tests.test_blobstore_contract import s3_settings


def _settings(tmp_path: Path, store: Path, endpoint: str, **kw: object) -> object:
    base = s3_settings(endpoint).model_dump(include={"blob_store", "s3_endpoint_url", "s3_bucket",
                                                     "s3_access_key_id", "s3_secret_access_key"})
    return test_settings(tmp_path, store, **{**base, **kw})


def test_s3_store_serves_ranges_renditions_and_deletes(tiny_store: Path, tmp_path: Path,
                                                       s3_endpoint: str) -> None:
    settings = _settings(tmp_path, tiny_store, s3_endpoint)
    with LiveServer(settings) as srv, srv.client() as c:  # type: ignore[arg-type]
        store = srv.app.state.service.store
        assert isinstance(store, S3BlobStore)
        r = c.post("/images", content=png_bytes(photo(96, 64)),
                   params={"wait": "true", "widths": "24,48,96"})
        assert r.status_code == 201, r.text
        iid, size = r.json()["id"], r.json()["size"]
        stored = store.get(f"images/{iid}.cmp")
        assert len(stored) == size and not (tmp_path / "blobs").exists()  # nothing on local disk
        full = c.get(f"/images/{iid}/bitstream")
        assert full.status_code == 200 and full.content == stored
        layer = r.json()["layers"][1]
        part = c.get(f"/images/{iid}/bitstream", headers={"Range": layer["prefix_range"]})
        assert part.status_code == 206 and part.content == stored[: layer["byte_end"] + 1]
        assert part.headers["content-range"] == f"bytes 0-{layer['byte_end']}/{size}"
        tail = c.get(f"/images/{iid}/bitstream", headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == stored[-10:]
        bad = c.get(f"/images/{iid}/bitstream", headers={"Range": f"bytes={size + 5}-"})
        assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{size}"
        assert c.get(f"/images/{iid}/bitstream", headers={"Range": "bytes=0-1,5-6"}).content == stored
        head = c.head(f"/images/{iid}/bitstream", headers={"Range": "bytes=0-9"})
        assert head.status_code == 206 and head.headers["content-length"] == "10"
        first = c.get(f"/images/{iid}", params={"width": 40, "format": "png"})
        again = c.get(f"/images/{iid}", params={"width": 40, "format": "png"})
        assert first.status_code == 200 and first.headers["x-compass-cache"] == "miss"
        assert again.headers["x-compass-cache"] == "hit" and again.content == first.content
        assert (tmp_path / "renditions").is_dir()  # renditions are cached on this node's disk
        assert c.delete(f"/images/{iid}").status_code == 204
        assert list(store.keys()) == []


def test_s3_presigned_redirects(tiny_store: Path, tmp_path: Path, s3_endpoint: str) -> None:
    settings = _settings(tmp_path, tiny_store, s3_endpoint, s3_presign=True)
    with LiveServer(settings) as srv, srv.client() as c:  # type: ignore[arg-type]
        r = c.post("/images", content=png_bytes(photo(64, 48, seed=3)), params={"wait": "true"})
        iid = r.json()["id"]
        redirect = c.get(f"/images/{iid}/bitstream", headers={"Range": "bytes=0-15"})
        assert redirect.status_code == 307
        location = redirect.headers["location"]
        assert location.startswith(s3_endpoint) and "Signature" in location
        # The client repeats its Range on the redirect; the store answers it.
        got = httpx.get(location, headers={"Range": "bytes=0-15"})
        stored = srv.app.state.service.store.get(f"images/{iid}.cmp")
        assert got.status_code == 206 and got.content == stored[:16]
        assert c.get(f"/images/{iid}/bitstream", follow_redirects=True).content[:4] == got.content[:4]
    # A restarted node serves the same image from the bucket.
    with LiveServer(settings) as srv, srv.client() as c:  # type: ignore[arg-type]
        assert c.get(f"/images/{iid}", params={"width": 32}).status_code == 200
