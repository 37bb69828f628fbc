"""`CeleryQueue`: the API side of the scaled shape, with the same face as the in-process
`EncodePool` (reserve / submit / depth / alive), so `ImageService` does not care which it has.

The bound on waiting jobs is the length of the Redis list Celery queues encode jobs in; asking
Redis also tells whether the broker is up, so an upload finds an outage before it stores anything.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import redis
from celery import Celery

from compass_serve.server.celery_app import (
    DECODE_QUEUE,
    ENCODE_QUEUE,
    ENCODE_TASK,
    RENDER_TASK,
    encode_task_id,
    make_celery,
)
from compass_serve.server.settings import Settings
from compass_serve.server.worker import EncodeJob, QueueFull

log = logging.getLogger("compass_serve.server")

_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
#: Redis key prefix under which workers announce themselves (value: device), with a TTL.
WORKER_KEY = "compass:worker:"


class NoReservation:
    """Remote queues need no slot: the bound is checked against Redis when reserving."""

    used = False

    def release(self) -> None:
        self.used = True


class CeleryQueue:
    remote = True

    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.queue_size = settings.queue_size
        self.app = app or make_celery(settings)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=10)

    # -- the EncodePool face ----------------------------------------------------------------------
    def depth(self) -> int:
        return int(self.redis.llen(ENCODE_QUEUE))  # type: ignore[arg-type]

    def busy(self) -> int:
        return 0  # running jobs are on other machines

    def is_full(self) -> bool:
        return self.depth() >= self.queue_size

    def reserve(self) -> NoReservation:
        if self.is_full():
            raise QueueFull(f"the encode queue is full ({self.queue_size} jobs waiting)")
        return NoReservation()

    def submit(self, job: EncodeJob, reservation: Any = None) -> None:
        """Publish an encode job (the decoded upload is not sent: workers read the source blob)."""
        if reservation is not None:
            reservation.used = True
        # Two quick retries replace a pooled connection that died with a Redis restart; while
        # Redis is down the upload answers 503 within a second instead of hanging.
        self.app.send_task(ENCODE_TASK, args=[job.image_id], task_id=encode_task_id(job.image_id),
                           queue=ENCODE_QUEUE, retry=True, retry_policy=_PUBLISH_RETRY)

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 30.0) -> None:
        self.redis.close()

    def alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    # -- scaled-only ------------------------------------------------------------------------------
    def workers(self) -> dict[str, str]:
        """Workers seen recently (name -> device), from their heartbeats."""
        out: dict[str, str] = {}
        for key in self.redis.scan_iter(match=WORKER_KEY + "*", count=100):
            name = key.decode() if isinstance(key, bytes) else str(key)
            value = self.redis.get(name)
            if value is not None:
                text = value.decode() if isinstance(value, bytes) else str(value)
                out[name.removeprefix(WORKER_KEY)] = text
        return out

    def render(self, image_id: str, end: int, width: int, fmt: str, quality: int | None,
               timeout: float, *, model: str, weights_id: str) -> bytes:
        """Decode a rendition on a worker (blocking; call from a thread). The weights version is
        the stream's own, so images coded before a retrain decode with their archived weights."""
        result = self.app.send_task(RENDER_TASK, args=[image_id, end, width, fmt, quality, model, weights_id],
                                    queue=DECODE_QUEUE, retry=True, retry_policy=_PUBLISH_RETRY,
                                    ignore_result=False)
        try:
            encoded = result.get(timeout=timeout, disable_sync_subtasks=False)
        finally:
            result.forget()
        return base64.b64decode(encoded)
