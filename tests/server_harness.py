"""Run the service on a real socket (uvicorn in a thread) for the server tests and the benchmark."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from PIL import Image

from compass_serve.server import Settings, create_app


class LiveServer:
    """uvicorn serving `create_app(settings)` on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True, name="uvicorn-test")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(60)
        self._sock.close()

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60.0), **kw)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def held_encodes(server: LiveServer) -> Iterator[threading.Event]:
    """Hold the in-process encode workers at a gate (images stay observably pending, the queue
    fills deterministically) until the gate is set or the block ends."""
    pool = server.app.state.service.pool
    gate = threading.Event()
    original = pool._handler

    def gated(job: object) -> None:
        gate.wait(60)
        original(job)

    pool._handler = gated
    try:
        yield gate
    finally:
        pool._handler = original
        gate.set()


def test_settings(data_dir: Path, store: Path, **overrides: Any) -> Settings:
    """Settings for a test server on the tiny random-weight model."""
    values: dict[str, Any] = dict(
        data_dir=data_dir, model="tiny", model_store=store, max_upload_bytes=512 * 1024,
        max_pixels=4_000_000, max_width=2048, queue_size=64, encode_workers=2,
    )
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test despite the name


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def wait_ready(client: httpx.Client, image_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll the manifest until the image leaves `pending`."""
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/images/{image_id}/manifest")
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        if body["status"] != "pending":
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{image_id} still pending after {timeout} s")
        time.sleep(0.05)


def upload(client: httpx.Client, data: bytes, filename: str = "img.png", **params: Any) -> httpx.Response:
    """Multipart upload (field `file`)."""
    return client.post("/images", params=params, files={"file": (filename, data, "image/png")})
