"""Durability: a restarted server serves everything it had; crashes leave nothing half-done."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from compass_serve.codec.coder import Codec
from compass_serve.server.db import FAILED, PENDING, Database, ImageRecord
from compass_serve.server.service import image_id_for, source_key, stream_key
from compass_serve.server.storage import LocalBlobStore
from tests.conftest import photo
from tests.server_harness import LiveServer, png_bytes, test_settings, upload, wait_ready

REPO = Path(__file__).resolve().parents[1]


def test_restart_serves_everything(tiny_store: Path, tmp_path: Path) -> None:
    settings = test_settings(tmp_path, tiny_store)
    seen: dict[str, tuple[dict, bytes, bytes, str]] = {}
    with LiveServer(settings) as srv, srv.client() as c:
        for seed in range(4):
            r = c.post("/images", content=png_bytes(photo(72, 48, seed=seed)), params={"wait": "true"})
            assert r.status_code == 201
            iid = r.json()["id"]
            rendition = c.get(f"/images/{iid}", params={"width": 50, "format": "webp"})
            seen[iid] = (r.json(), c.get(f"/images/{iid}/bitstream").content, rendition.content,
                         rendition.headers["etag"])
    with LiveServer(settings) as srv, srv.client() as c:
        assert c.get("/readyz").status_code == 200
        listed = [it["id"] for it in c.get("/images").json()["items"]]
        assert listed == list(seen)
        for iid, (manifest, stream, rendition, etag) in seen.items():
            assert c.get(f"/images/{iid}/manifest").json() == manifest
            assert c.get(f"/images/{iid}/bitstream").content == stream
            r = c.get(f"/images/{iid}", params={"width": 50, "format": "webp"})
            assert r.headers["x-compass-cache"] == "hit"  # the on-disk cache survived too
            assert r.content == rendition and r.headers["etag"] == etag
            assert c.get(f"/images/{iid}", params={"width": 50, "format": "webp"},
                         headers={"If-None-Match": etag}).status_code == 304


def test_startup_recovers_from_interrupted_work(tiny_store: Path, tmp_path: Path, tiny_codec: Codec) -> None:
    """Leftovers of every crash point: all made consistent before the server answers."""
    settings = test_settings(tmp_path, tiny_store)
    with LiveServer(settings) as srv, srv.client() as c:
        kept = c.post("/images", content=png_bytes(photo(40, 30)), params={"wait": "true"}).json()["id"]

    store = LocalBlobStore(settings.blob_dir)
    db = Database(settings.db_url)
    weights = tiny_codec.weights_id.hex()

    def pending_row(data: bytes) -> str:
        iid = image_id_for(hashlib.sha256(data).hexdigest(), "tiny", weights, 3.0, None, None)
        db.insert(ImageRecord(id=iid, status=PENDING, model="tiny", weights_id=weights, quality=3.0,
                              source_format="PNG", source_bytes=len(data), width=48, height=32))
        return iid

    # 1. Crash after the upload was accepted, before it was encoded: row + source blob.
    queued_data = png_bytes(photo(48, 32, seed=9))
    queued = pending_row(queued_data)
    store.put(source_key(queued), queued_data)
    # 2. A pending row whose source is gone (e.g. files restored from an older backup).
    lost = pending_row(png_bytes(photo(48, 32, seed=10)))
    # 3. Crash mid-write: a temporary file that was never renamed.
    (settings.blob_dir / ".tmp" / "images-x.cmp.123.part").write_bytes(b"CMPS half")
    # 4. Crash after an encode was written but before its row was committed: an orphan stream.
    store.put(stream_key("f" * 32), b"CMPS orphan")
    # 5. Crash after a source was written but before its row was committed.
    store.put(source_key("e" * 32), b"orphan upload")
    # 6. Renditions of an image that no longer exists, and an unfinished rendition write.
    (settings.rendition_dir / "dd" / ("d" * 32)).mkdir(parents=True)
    (settings.rendition_dir / "dd" / ("d" * 32) / "10.png").write_bytes(b"x")
    (settings.rendition_dir / ".tmp").mkdir(exist_ok=True)
    (settings.rendition_dir / ".tmp" / "10.png.part").write_bytes(b"x")
    db.close()

    with LiveServer(settings) as srv, srv.client() as c:
        assert wait_ready(c, queued)["status"] == "ready"
        assert c.get(f"/images/{queued}", params={"width": 20}).status_code == 200
        failed = c.get(f"/images/{lost}/manifest").json()
        assert failed["status"] == FAILED and "upload it again" in failed["reason"]
        r = c.get(f"/images/{lost}")
        assert r.status_code == 409 and "could not be encoded" in r.json()["detail"]
        assert c.get(f"/images/{kept}/bitstream").status_code == 200
        # Re-uploading the lost image's bytes gives it another chance under the same id.
        again = upload(c, png_bytes(photo(48, 32, seed=10)))
        assert again.json()["id"] == lost and wait_ready(c, lost)["status"] == "ready"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    blobs = [f for f in files if f.startswith("blobs/")]
    assert blobs == sorted(f"blobs/{stream_key(i)}" for i in (kept, queued, lost))
    assert not any(f.startswith("renditions/dd/") or f.startswith("renditions/.tmp") for f in files)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(data_dir: Path, store: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COMPASS_MODEL": "tiny", "COMPASS_MODEL_STORE": str(store),
           "COMPASS_ENCODE_WORKERS": "1"}
    cmd = [sys.executable, "-m", "compass_serve.cli", "serve", "--port", str(port),
           "--data-dir", str(data_dir)]
    log = data_dir.parent / f"{data_dir.name}-server.log"
    with log.open("ab") as out:  # a file, not a pipe: a full pipe would block the server's logging
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("server did not start")
        time.sleep(0.1)


def test_sigkill_mid_encode_then_restart(tiny_store: Path, tmp_path: Path) -> None:
    """`compass-serve serve` killed with work in flight: after a restart every accepted upload is served."""
    port = _free_port()
    proc = _spawn(tmp_path, tiny_store, port)
    accepted: list[str] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            for seed in range(4):
                r = upload(c, png_bytes(photo(320, 240, seed=seed)))
                assert r.status_code == 202
                accepted.append(r.json()["id"])
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown handlers: a crash
        proc.wait(30)
    # Restart in-process on the same data dir (one subprocess start is slow enough).
    with LiveServer(test_settings(tmp_path, tiny_store)) as srv, srv.client() as c:
        for iid in accepted:
            assert wait_ready(c, iid)["status"] == "ready"
            assert c.get(f"/images/{iid}/bitstream").status_code == 200
            assert c.get(f"/images/{iid}", params={"width": 100}).status_code == 200
        assert sorted(it["id"] for it in c.get("/images").json()["items"]) == sorted(accepted)
    assert not list((tmp_path / "blobs" / "sources").glob("*"))
    assert not list((tmp_path / "blobs" / ".tmp").glob("*"))
