"""Concurrent uploads lose nothing; a full encode queue answers 503 + Retry-After and keeps no trace;
a delete racing a read answers 404, never 500, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from compass_serve.codec.coder import Codec
from compass_serve.server.encoder import stream_key
from tests.conftest import photo
from tests.server_harness import LiveServer, held_encodes, png_bytes, test_settings, upload, wait_ready


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "compass.db" not in p.name)


async def _upload_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*[
            c.post("/images", files={"file": (f"{i}.png", b, "image/png")}, params={"widths": "16,32,64"})
            for i, b in enumerate(bodies)
        ])


def test_twenty_concurrent_uploads(tiny_store: Path, tmp_path: Path, tiny_codec: Codec) -> None:
    bodies = [png_bytes(photo(64, 48, seed=1000 + i)) for i in range(20)]
    duplicate = png_bytes(photo(64, 48, seed=4242))
    with LiveServer(test_settings(tmp_path, tiny_store)) as srv, srv.client() as c:
        responses = asyncio.run(_upload_all(srv.url, bodies + [duplicate] * 5))
        assert all(r.status_code in (200, 202) for r in responses), [r.text for r in responses]
        ids = [r.json()["id"] for r in responses]
        assert len(set(ids[:20])) == 20
        assert len(set(ids[20:])) == 1  # the same bytes five times: one image
        for image_id in set(ids):
            manifest = wait_ready(c, image_id)
            assert manifest["status"] == "ready", manifest
            data = c.get(f"/images/{image_id}/bitstream").content
            assert tiny_codec.decode(data).image.size == (64, 48)
        listed = c.get("/images", params={"limit": 100}).json()["items"]
        assert sorted(it["id"] for it in listed) == sorted(set(ids))
        assert 'compass_uploads_total{outcome="accepted"} 21.0' in c.get("/metrics").text


def test_full_queue_answers_503(tiny_store: Path, tmp_path: Path) -> None:
    settings = test_settings(tmp_path, tiny_store, queue_size=2, encode_workers=1, retry_after_s=7)
    with LiveServer(settings) as srv, srv.client() as c:
        svc = srv.app.state.service
        # The single worker is held at a gate, so the queue fills deterministically.
        with held_encodes(srv) as gate:
            first = upload(c, png_bytes(photo(40, 30, seed=1)))
            assert first.status_code == 202
            deadline = time.monotonic() + 10
            while svc.pool.busy() != 1:  # the worker has taken job 1 and is held at the gate
                assert time.monotonic() < deadline
                time.sleep(0.01)
            queued = [upload(c, png_bytes(photo(40, 30, seed=s))) for s in (2, 3)]
            assert [r.status_code for r in queued] == [202, 202]
            assert svc.pool.depth() == 2
            assert "compass_encode_queue_depth 2.0" in c.get("/metrics").text
            before = c.get("/images").json()["items"]
            files_before = stored_files(tmp_path)
            rejected = upload(c, png_bytes(photo(40, 30, seed=4)))
            assert rejected.status_code == 503
            assert rejected.headers["retry-after"] == "7"
            assert rejected.headers["content-type"] == "application/problem+json"
            assert "queue" in rejected.json()["detail"]
            assert c.get("/images").json()["items"] == before  # nothing kept of the refused upload
            assert stored_files(tmp_path) == files_before
            # A duplicate of an accepted upload is not new work: it is answered even now.
            again = upload(c, png_bytes(photo(40, 30, seed=2)))
            assert again.status_code == 202 and again.json()["id"] == queued[0].json()["id"]
            gate.set()
        for r in [first, *queued]:
            assert wait_ready(c, r.json()["id"])["status"] == "ready"
        assert upload(c, png_bytes(photo(40, 30, seed=4))).status_code == 202


@pytest.mark.parametrize("n", [6])
def test_concurrent_cold_renditions_share_one_decode(tiny_store: Path, tmp_path: Path, n: int) -> None:
    with LiveServer(test_settings(tmp_path, tiny_store)) as srv, srv.client() as c:
        r = c.post("/images", content=png_bytes(photo(64, 48)), params={"wait": "true"})
        image_id = r.json()["id"]

        async def fetch_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                return await asyncio.gather(*[
                    ac.get(f"/images/{image_id}", params={"width": 50, "format": "png"}) for _ in range(n)
                ])

        responses = asyncio.run(fetch_all())
        assert {r.status_code for r in responses} == {200}
        assert len({r.content for r in responses}) == 1
        text = c.get("/metrics").text
        assert "compass_decode_duration_seconds_count 1.0" in text


@pytest.mark.parametrize("hold", ["before_read", "after_decode"])
def test_delete_during_a_rendition_decode(tiny_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          hold: str) -> None:
    """A delete that lands while a rendition is decoding: the GET answers 404 if the stream was already
    gone when it was read, the picture if it was decoded first; either way nothing of the image stays."""
    with LiveServer(test_settings(tmp_path, tiny_store)) as srv, srv.client() as c:
        image_id = c.post("/images", content=png_bytes(photo(64, 48, seed=9)),
                          params={"wait": "true"}).json()["id"]
        svc = srv.app.state.service
        entered, gate = threading.Event(), threading.Event()
        target, name = (svc.store, "read_range") if hold == "before_read" else (svc, "_decode_rendition")
        original = getattr(target, name)

        def held(*args: Any, **kwargs: Any) -> Any:
            if hold == "before_read":
                entered.set()
                gate.wait(30)
                return original(*args, **kwargs)
            out = original(*args, **kwargs)
            entered.set()
            gate.wait(30)
            return out

        monkeypatch.setattr(target, name, held)

        def get() -> httpx.Response:
            with srv.client() as other:
                return other.get(f"/images/{image_id}", params={"width": 50, "format": "png"})

        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get)
            assert entered.wait(30)
            assert c.delete(f"/images/{image_id}").status_code == 204
            gate.set()
            r = pending.result(timeout=60)
        if hold == "before_read":
            assert r.status_code == 404, r.text
            assert r.headers["content-type"] == "application/problem+json" and "deleted" in r.json()["detail"]
        else:
            assert r.status_code == 200, r.text
            assert Image.open(io.BytesIO(r.content)).size[0] == 50
        assert svc.cache.get(image_id, 50, "png") is None
        assert not any(image_id in str(p) for p in srv.settings.data_dir.rglob("*"))
        assert c.get(f"/images/{image_id}", params={"width": 50, "format": "png"}).status_code == 404


def test_bitstream_whose_file_vanished_is_404(tiny_store: Path, tmp_path: Path) -> None:
    """The stream deleted between the row lookup and the file's stat: a 404, not a 500."""
    with LiveServer(test_settings(tmp_path, tiny_store)) as srv, srv.client() as c:
        image_id = c.post("/images", content=png_bytes(photo(64, 48, seed=10)),
                          params={"wait": "true"}).json()["id"]
        svc = srv.app.state.service
        assert svc.store.delete(stream_key(image_id))  # the row stays: the window a delete races through
        r = c.get(f"/images/{image_id}/bitstream", headers={"Range": "bytes=0-9"})
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
