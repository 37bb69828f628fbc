"""An API process in Celery mode (Redis broker), without workers: the queue's bound and readiness."""

from __future__ import annotations

from pathlib import Path

import redis

from compass_serve.server.celery_app import ENCODE_QUEUE
from compass_serve.server.jobs import WORKER_KEY
from tests.conftest import photo
from tests.server_harness import LiveServer, png_bytes, test_settings, upload


def test_full_celery_queue_answers_503_and_keeps_nothing(tiny_store: Path, tmp_path: Path,
                                                         redis_url: str) -> None:
    # A database number of its own, so jobs of other tests cannot count against the bound.
    url = redis_url.rsplit("/", 1)[0] + "/7"
    r = redis.Redis.from_url(url)
    r.flushdb()
    settings = test_settings(tmp_path, tiny_store, queue="celery", broker_url=url, queue_size=2,
                             retry_after_s=3, wait_timeout_s=0.5)
    with LiveServer(settings) as srv, srv.client() as c:
        ready = c.get("/readyz").json()
        assert ready["checks"]["queue"] == "ok" and ready["checks"]["workers"] == "ok: none seen yet"
        first = [upload(c, png_bytes(photo(40, 30, seed=s))) for s in (1, 2)]
        assert [x.status_code for x in first] == [202, 202]
        assert r.llen(ENCODE_QUEUE) == 2  # the jobs wait in Redis for a worker
        ids = {x.json()["id"] for x in first}
        refused = upload(c, png_bytes(photo(40, 30, seed=3)))
        assert refused.status_code == 503 and refused.json()["code"] == "queue_full"
        assert refused.headers["retry-after"] == "3"
        assert {it["id"] for it in c.get("/images").json()["items"]} == ids  # nothing of the refused one
        # wait=true polls the shared database; with no worker it gives up after wait_timeout_s.
        waited = c.post("/images", content=png_bytes(photo(40, 30, seed=1)), params={"wait": "true"})
        assert waited.status_code == 202 and waited.json()["status"] == "pending"
        r.set(WORKER_KEY + "gpu-box", "cuda", ex=30)  # a worker's heartbeat
        assert c.get("/readyz").json()["checks"]["workers"] == "ok: 1 (gpu-box=cuda)"
        assert 'compass_encode_queue_depth 2.0' in c.get("/metrics").text
    r.flushdb()
