"""The SDK against live servers on loopback: the real service, and a scripted one for failures.

Bytes are counted by a transport wrapper under httpx (what actually arrived from the socket),
not by anything the SDK reports about itself.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from compass_serve import AsyncClient, Client
from compass_serve.client import (
    EncoderModel,
    Manifest,
    ModelMismatch,
    NotFound,
    NotReady,
    RequestRejected,
    ServerError,
    TransportError,
    TruncatedResponse,
)
from tests.conftest import make_tiny, photo
from tests.server_harness import LiveServer, png_bytes

W, H = 160, 100
LADDER = [40, 80, 160]


class Counting(httpx.HTTPTransport):
    """Counts the response body bytes each request really received."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        body = resp.read()
        self.received.append((request.headers.get("range", ""), len(body)))
        return httpx.Response(resp.status_code, headers=resp.headers, content=body,
                              request=request)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.received)


@pytest.fixture(scope="module")
def uploaded(server: LiveServer, tiny_store: Path) -> Manifest:
    with Client(server.url, model_store=tiny_store) as c:
        return c.upload(photo(W, H, seed=7), widths=LADDER, quality=2, wait=True)


def client(server: LiveServer, store: Path, **kw: object) -> tuple[Client, Counting]:
    transport = Counting()
    return Client(server.url, model_store=store, transport=transport, **kw), transport


def test_upload_sources_and_idempotent_ids(server: LiveServer, tiny_store: Path,
                                           tmp_path: Path) -> None:
    img = photo(90, 60, seed=11)
    data = png_bytes(img)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    with Client(server.url, model_store=tiny_store) as c:
        a = c.upload(path, widths=[45, 90])
        b = c.upload(data, widths=[45, 90])
        d = c.upload(io.BytesIO(data), widths=[45, 90])
        e = c.upload(img, widths=[45, 90], wait=False)
    assert a.id == b.id == d.id and a.ready and [la.width for la in a.layers] == [45, 90]
    assert e.status in ("pending", "ready")


def test_fetch_transfers_header_plus_exactly_the_needed_layers(
        server: LiveServer, tiny_store: Path, uploaded: Manifest) -> None:
    for width, layer in [(10, 0), (40, 0), (41, 1), (80, 1), (100, 2), (160, 2), (300, 2)]:
        c, counted = client(server, tiny_store)
        with c:
            img = c.fetch(uploaded.id, width)
        assert img.width == width and img.height == max(1, round(H * width / W))
        expected = uploaded.layers[layer].byte_end + 1
        bitstream = [n for r, n in counted.received if r.startswith("bytes=")]
        assert bitstream == [expected], (width, counted.received)


def test_progressive_transfers_the_stream_exactly_once(
        server: LiveServer, tiny_store: Path, uploaded: Manifest) -> None:
    c, counted = client(server, tiny_store)
    widths = [20, 40, 60, 80, 120, 160]
    with c:
        images = list(c.progressive(uploaded.id, widths))
    assert [im.width for im in images] == widths
    ranges = [(r, n) for r, n in counted.received if r.startswith("bytes=")]
    assert sum(n for _, n in ranges) == uploaded.size
    assert len(ranges) == 3  # one request per new layer, none for widths already covered


def test_local_decode_equals_server_decode(server: LiveServer, tiny_store: Path,
                                           uploaded: Manifest) -> None:
    """Entropy decoding is bit-exact by construction (exact hyper-synthesis); the float32
    synthesis and LIFF may round differently in another thread or on another CPU, so decoded
    pixels agree to within one code value on a few pixels at most."""
    with Client(server.url, model_store=tiny_store) as c:
        for width in (40, 57, 80, 160):
            local = np.asarray(c.fetch(uploaded.id, width).convert("RGB")).astype(int)
            remote = np.asarray(c.get(uploaded.id, width=width, format="png").convert("RGB")).astype(int)
            assert local.shape == remote.shape
            diff = np.abs(local - remote)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (width, diff.max(), (diff > 0).sum())


def test_model_gives_the_quality_range(server: LiveServer, tiny_store: Path,
                                      uploaded: Manifest) -> None:
    with Client(server.url, model_store=tiny_store) as c:
        m = c.model()
        default = c.upload(photo(W, H, seed=8), widths=LADDER)
    assert (m.name, m.weights_id) == (uploaded.model, uploaded.weights_id)
    assert m.qualities == len(m.lambdas) >= 2 and 1 <= m.default_quality <= m.qualities
    assert default.quality == m.default_quality
    assert asyncio.run(_async_model(server, tiny_store)) == m


async def _async_model(server: LiveServer, store: Path) -> EncoderModel:
    async with AsyncClient(server.url, model_store=store) as c:
        return await c.model()


def test_async_client_same_results(server: LiveServer, tiny_store: Path,
                                   uploaded: Manifest) -> None:
    async def run() -> tuple[list[int], np.ndarray, Manifest]:
        async with AsyncClient(server.url, model_store=tiny_store) as c:
            man = await c.manifest(uploaded.id)
            img = await c.fetch(uploaded.id, 80)
            widths = [im.width async for im in c.progressive(uploaded.id, [40, 80, 160])]
            return widths, np.asarray(img), man

    widths, img, man = asyncio.run(run())
    assert widths == [40, 80, 160] and img.shape == (50, 80, 3) and man == uploaded
    with Client(server.url, model_store=tiny_store) as c:
        assert np.array_equal(np.asarray(c.fetch(uploaded.id, 80)), img)


def test_model_mismatch_and_not_found(server: LiveServer, uploaded: Manifest,
                                      tmp_path: Path) -> None:
    other = tmp_path / "store"
    make_tiny(other, "tiny", seed=5)  # same name, other weights
    with Client(server.url, model_store=other) as c:
        with pytest.raises(ModelMismatch, match=uploaded.weights_id):
            c.fetch(uploaded.id, 80)
        with pytest.raises(NotFound):
            c.fetch("0" * 32, 80)
        with pytest.raises(RequestRejected):
            c.get(uploaded.id, width=0)
        with pytest.raises(ValueError):
            c.fetch(uploaded.id, 0)


# -- a scripted server for failure behaviour -------------------------------------------------------
class Script:
    """State of the scripted server: how many failures to inject before behaving."""

    def __init__(self, stream: bytes, manifest: dict) -> None:
        self.stream, self.manifest = stream, manifest
        self.unavailable = 0      # answer 503 + Retry-After this many times
        self.truncate = 0         # send a short 206 body this many times
        self.ignore_range = False
        self.delay = 0.0
        self.hits = 0

    def app(self) -> Starlette:
        async def manifest(_: Request) -> Response:
            return JSONResponse(self.manifest)

        async def bitstream(request: Request) -> Response:
            self.hits += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.unavailable > 0:
                self.unavailable -= 1
                return Response(status_code=503, headers={"Retry-After": "1"})
            rng = request.headers.get("range")
            if self.ignore_range or not rng:
                return Response(self.stream, media_type="application/octet-stream")
            a, b = (int(v) for v in rng.removeprefix("bytes=").split("-"))
            body = self.stream[a : b + 1]
            if self.truncate > 0:
                self.truncate -= 1
                body = body[: len(body) // 2]
            return Response(body, status_code=206, headers={
                "Content-Range": f"bytes {a}-{a + len(body) - 1}/{len(self.stream)}"})

        return Starlette(routes=[Route("/images/{id}/manifest", manifest),
                                 Route("/images/{id}/bitstream", bitstream)])


@pytest.fixture()
def scripted(server: LiveServer, uploaded: Manifest) -> Iterator[tuple[Script, str]]:
    with server.client() as h:
        stream = h.get(f"/images/{uploaded.id}/bitstream").content
        man = h.get(f"/images/{uploaded.id}/manifest").json()
    script = Script(stream, man)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(script.app(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield script, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)
    sock.close()


def test_retries_honour_retry_after(scripted: tuple[Script, str], tiny_store: Path,
                                    uploaded: Manifest) -> None:
    script, url = scripted
    script.unavailable = 2
    with Client(url, model_store=tiny_store, backoff=0.01) as c:
        t = time.monotonic()
        img = c.fetch(uploaded.id, 80)
        assert time.monotonic() - t >= 2.0  # two Retry-After: 1 waits
    assert img.width == 80 and script.hits == 3
    script.unavailable = 10
    with Client(url, model_store=tiny_store, retries=1, max_retry_wait=0.05) as c, \
            pytest.raises(ServerError) as err:
        c.fetch(uploaded.id, 80)
    assert err.value.status == 503


def test_truncated_bodies_are_retried_then_reported(scripted: tuple[Script, str],
                                                    tiny_store: Path, uploaded: Manifest) -> None:
    script, url = scripted
    script.truncate = 1
    with Client(url, model_store=tiny_store, backoff=0.01) as c:
        assert c.fetch(uploaded.id, 160).width == 160
        script.truncate = 100
        with pytest.raises(TruncatedResponse):
            c.fetch(uploaded.id, 160)


def test_server_ignoring_range_still_works(scripted: tuple[Script, str], tiny_store: Path,
                                           uploaded: Manifest) -> None:
    script, url = scripted
    script.ignore_range = True
    with Client(url, model_store=tiny_store) as c:
        images = list(c.progressive(uploaded.id, [40, 160]))
        assert [im.width for im in images] == [40, 160]
        assert np.array_equal(np.asarray(c.fetch(uploaded.id, 40)), np.asarray(images[0]))


def test_slow_and_down_servers(scripted: tuple[Script, str], tiny_store: Path,
                               uploaded: Manifest) -> None:
    script, url = scripted
    script.delay = 2.0
    with Client(url, model_store=tiny_store, timeout=0.3, retries=1, backoff=0.01) as c, \
            pytest.raises(TransportError):
        c.fetch(uploaded.id, 80)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    with Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as c, \
            pytest.raises(TransportError):
        c.manifest("x")


def test_not_ready(scripted: tuple[Script, str], tiny_store: Path, uploaded: Manifest) -> None:
    script, url = scripted
    script.manifest = {**script.manifest, "status": "failed", "reason": "encoder crashed",
                       "layers": []}
    with Client(url, model_store=tiny_store) as c, pytest.raises(NotReady, match="crashed"):
        c.fetch(uploaded.id, 80)


def test_image_is_a_pil_image(server: LiveServer, tiny_store: Path, uploaded: Manifest) -> None:
    with Client(server.url, model_store=tiny_store) as c:
        assert isinstance(c.get(uploaded.id, width=50), Image.Image)
