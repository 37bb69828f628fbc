"""The scaled shape end to end: PostgreSQL + Redis + two API processes + Celery worker processes.

Everything runs for real on loopback (servers from tests/backing.py, processes from
tests/scale_harness.py); the blob store is a directory all processes share, as a volume would be.
The tests share one cluster and run in file order: load, a worker crash, then outages.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from compass_serve.codec.coder import Codec
from compass_serve.server.db import PENDING, READY, Database
from tests.backing import PostgresServer, RedisServer
from tests.conftest import photo
from tests.scale_harness import (
    Proc,
    launch_api,
    launch_worker,
    scaled_env,
    start_worker,
    wait_api,
    wait_worker,
)
from tests.server_harness import png_bytes

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    pg: PostgresServer
    redis: RedisServer
    env: dict[str, str]
    root: Path
    db: Database
    apis: list[tuple[Proc, str]] = field(default_factory=list)
    worker: Proc | None = None
    worker_port: int = 0
    names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def urls(self) -> list[str]:
        return [url for _proc, url in self.apis]

    def start_worker(self) -> Proc:
        name = f"compass-{next(self.names)}@test"
        self.worker, self.worker_port = start_worker(self.env, self.root / f"{name}.log", name)
        return self.worker


@pytest.fixture(scope="module")
def cluster(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("scaled")
    pg = PostgresServer().start()  # its own server: the outage test stops it
    redis = RedisServer().start()
    url = pg.create_database(f"e2e_{uuid.uuid4().hex[:8]}")
    env = scaled_env({
        "COMPASS_DATABASE_URL": url, "COMPASS_BROKER_URL": redis.url,
        "COMPASS_BLOB_PATH": str(root / "blobs"), "COMPASS_MODEL": "tiny",
        "COMPASS_MODEL_STORE": str(tiny_store),
        "COMPASS_QUEUE_SIZE": "500", "COMPASS_MAX_UPLOAD_BYTES": str(32 * 1024 * 1024),
        # Short timers so a crash or an outage resolves within seconds, not minutes.
        "COMPASS_VISIBILITY_TIMEOUT_S": "4", "COMPASS_JOB_BACKOFF_S": "0.5", "COMPASS_JOB_BACKOFF_MAX_S": "2",
        "COMPASS_JOB_MAX_RETRIES": "60", "COMPASS_RETRY_AFTER_S": "2", "COMPASS_HEARTBEAT_S": "1",
        "COMPASS_REQUEUE_AFTER_S": "6",
    })
    c = Cluster(pg, redis, env, root, Database(url))
    try:
        # Started side by side: each spends most of its start-up importing torch.
        launched = [launch_api(env, root / "api-a"),
                    # API b hands its cold decodes to the worker: its renditions must equal a's.
                    launch_api({**env, "COMPASS_DECODE_OFFLOAD": "true"}, root / "api-b")]
        c.apis.extend(launched)
        name = f"compass-{next(c.names)}@test"
        c.worker, c.worker_port = launch_worker(env, root / f"{name}.log", name)
        for proc, url in launched:
            wait_api(proc, url)
        wait_worker(c.worker, name)
        yield c
    finally:
        for proc in [p for p, _ in c.apis] + ([c.worker] if c.worker else []):
            proc.stop()
        c.db.close()
        redis.close()
        pg.close()


def wait_all_ready(url: str, ids: list[str], timeout: float = 120.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    out: dict[str, dict] = {}
    with httpx.Client(base_url=url, timeout=30) as c:
        while True:
            for iid in [i for i in ids if i not in out]:
                r = c.get(f"/images/{iid}/manifest")
                if r.status_code == 200 and r.json()["status"] != PENDING:
                    out[iid] = r.json()
            if len(out) == len(ids):
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - len(out)} image(s) still pending")
            time.sleep(0.2)


async def _upload_spread(urls: list[str], bodies: list[bytes]) -> list[httpx.Response]:
    clients = [httpx.AsyncClient(base_url=u, timeout=120) for u in urls]
    try:
        return await asyncio.gather(*[
            clients[i % len(clients)].post("/images", files={"file": (f"{i}.png", b, "image/png")})
            for i, b in enumerate(bodies)
        ])
    finally:
        for c in clients:
            await c.aclose()


def test_fifty_concurrent_uploads_over_two_apis(cluster: Cluster, tiny_codec: Codec) -> None:
    bodies = [png_bytes(photo(48 + i % 5 * 8, 40, seed=5000 + i)) for i in range(50)]
    twice = png_bytes(photo(48, 40, seed=4242))  # the same bytes to both APIs at once: one image
    responses = asyncio.run(_upload_spread(cluster.urls, [*bodies, twice, twice]))
    assert all(r.status_code == 202 for r in responses[:50]), [r.text for r in responses[:50]]
    ids = [r.json()["id"] for r in responses]
    assert len(set(ids[:50])) == 50 and ids[50] == ids[51]
    unique = sorted(set(ids))
    manifests = wait_all_ready(cluster.urls[0], unique)
    assert {m["status"] for m in manifests.values()} == {READY}

    a, b = (httpx.Client(base_url=u, timeout=60) for u in cluster.urls)
    with a, b:
        for iid in unique:
            assert b.get(f"/images/{iid}/manifest").json() == manifests[iid]
            stream = a.get(f"/images/{iid}/bitstream")
            assert stream.status_code == 200 and stream.content == b.get(f"/images/{iid}/bitstream").content
            assert stream.headers["etag"] == manifests[iid]["etag"]
            assert tiny_codec.decode(stream.content).image.width == manifests[iid]["width"]
        for iid in unique[:6]:  # renditions: a decodes itself, b has a worker decode; same bytes
            ra, rb = (c.get(f"/images/{iid}", params={"width": 24, "format": "png"}) for c in (a, b))
            assert ra.status_code == rb.status_code == 200
            assert ra.content == rb.content and ra.headers["etag"] == rb.headers["etag"]
        listed = b.get("/images", params={"limit": 100}).json()["items"]
        assert sorted(it["id"] for it in listed) == unique
        ready = a.get("/readyz").json()["checks"]
        assert ready["queue"] == "ok" and "=cpu" in ready["workers"]
    worker_ready = httpx.get(f"http://127.0.0.1:{cluster.worker_port}/readyz").json()
    assert worker_ready["device"] == "cpu" and worker_ready["status"] == "ready"
    assert "compass-1@test starting on cpu" in cluster.worker.log.read_text()  # type: ignore[union-attr]
    rows = cluster.db.all_rows()
    assert len(rows) == 51 and all(r.attempts == 1 and r.device == "cpu" for r in rows)  # each job ran once
    assert not list((cluster.root / "blobs" / "sources").glob("*"))
    assert len(list((cluster.root / "blobs" / "images").glob("*.cmp"))) == 51


def test_worker_sigkilled_mid_encode(cluster: Cluster) -> None:
    """A worker dies with a job in hand; a new worker finishes it; nothing is lost or doubled."""
    url = cluster.urls[0]
    bodies = [png_bytes(photo(1280, 960, seed=7000 + i)) for i in range(3)]
    with httpx.Client(base_url=url, timeout=60) as c:
        ids = [c.post("/images", content=b).json()["id"] for b in bodies]
    deadline = time.monotonic() + 60
    while True:  # wait until the worker is inside an encode (attempt counted, not yet ready)
        busy = [r for r in cluster.db.all_rows([PENDING]) if r.id in ids and r.attempts == 1]
        if busy:
            break
        assert time.monotonic() < deadline, "the worker never started encoding"
        time.sleep(0.02)
    assert cluster.worker is not None
    cluster.worker.kill()
    victim = cluster.db.get(busy[0].id)
    assert victim is not None and victim.status == PENDING and victim.attempts == 1  # killed mid-encode
    cluster.start_worker()
    manifests = wait_all_ready(url, ids)
    assert {m["status"] for m in manifests.values()} == {READY}
    again = cluster.db.get(victim.id)
    assert again is not None and again.attempts == 2  # redelivered once, to the new worker
    assert sum(1 for r in cluster.db.all_rows() if r.id in ids) == 3
    assert not list((cluster.root / "blobs" / "sources").glob("*"))
    with httpx.Client(base_url=url, timeout=60) as c:
        for iid in ids:
            stream = c.get(f"/images/{iid}/bitstream").content
            assert len(stream) == manifests[iid]["size"]


def _upload(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/images", content=png_bytes(photo(40, 32, seed=seed)), timeout=30)


def _wait_status(fn: object, status: int, timeout: float = 60.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = fn()  # type: ignore[operator]
            if r.status_code == status:
                return r
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no {status} within {timeout} s"
        time.sleep(0.2)


def test_postgres_outage(cluster: Cluster) -> None:
    a, b = cluster.urls
    accepted = [_upload([a, b][i % 2], 8000 + i) for i in range(8)]
    assert all(r.status_code == 202 for r in accepted)
    ids = [r.json()["id"] for r in accepted]
    cluster.pg.stop()
    try:
        for url in (a, b):
            r = _upload(url, 8100)
            assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
            assert r.headers["content-type"] == "application/problem+json"
            m = httpx.get(f"{url}/images/{ids[0]}/manifest", timeout=30)
            assert m.status_code == 503 and "database" in m.json()["detail"]
            assert httpx.get(f"{url}/readyz", timeout=30).status_code == 503
    finally:
        cluster.pg.start()
    for url in (a, b):  # each API reconnects by itself
        _wait_status(lambda url=url: httpx.get(f"{url}/readyz", timeout=10), 200)
    manifests = wait_all_ready(a, ids)
    assert {m["status"] for m in manifests.values()} == {READY}  # acknowledged uploads all done
    r = _upload(b, 8100)
    assert r.status_code == 202 and wait_all_ready(a, [r.json()["id"]])[r.json()["id"]]["status"] == READY


def test_redis_outage(cluster: Cluster) -> None:
    a, b = cluster.urls
    accepted = [_upload([a, b][i % 2], 9000 + i) for i in range(8)]
    assert all(r.status_code == 202 for r in accepted)
    ids = [r.json()["id"] for r in accepted]
    cluster.redis.stop()
    try:
        for url in (a, b):
            r = _upload(url, 9100)
            assert r.status_code == 503 and "job queue" in r.json()["detail"], r.text
            ready = httpx.get(f"{url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["queue"] == "unreachable"
        # Reads that need no queue keep working from the database and the store.
        assert httpx.get(f"{a}/images", timeout=30).status_code == 200
        before = {r.id for r in cluster.db.all_rows()}
    finally:
        cluster.redis.start()
    assert {r.id for r in cluster.db.all_rows()} == before  # refused uploads left no row
    for url in (a, b):
        _wait_status(lambda url=url: httpx.get(f"{url}/readyz", timeout=10), 200)
    manifests = wait_all_ready(a, ids)  # queued before the outage: survived the restart
    assert {m["status"] for m in manifests.values()} == {READY}
    r = _wait_status(lambda: _upload(b, 9100), 202)
    assert wait_all_ready(a, [r.json()["id"]])[r.json()["id"]]["status"] == READY
