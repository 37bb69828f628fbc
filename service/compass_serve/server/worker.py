"""In-process encode workers fed by a bounded queue.

Encoding is CPU-heavy torch work; it runs on dedicated threads (torch releases the GIL inside its
kernels) so the event loop stays free. The queue is bounded: `reserve()` fails fast when it is
full and the upload answers 503 with Retry-After instead of building an unbounded backlog. Jobs
requeued at start-up (`force=True`) may exceed the bound once; they were accepted before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

log = logging.getLogger("compass_serve.server")


class QueueFull(Exception):
    """No room for another encode job right now."""


@dataclass
class EncodeJob:
    image_id: str
    # The upload decoded by the request handler; None after a restart (reloaded from its blob).
    image: Image.Image | None = None


class Reservation:
    """A queue slot held between validation and submit, so a full queue is found before writes."""

    def __init__(self, pool: EncodePool) -> None:
        self._pool = pool
        self.used = False

    def release(self) -> None:
        if not self.used:
            self.used = True
            self._pool._release()


class EncodePool:
    """`workers` threads running `handler(job)` for each submitted job, in submission order."""

    def __init__(self, workers: int, queue_size: int, handler: Callable[[EncodeJob], None]) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._handler = handler
        self._jobs: deque[EncodeJob] = deque()
        self._reserved = 0
        self._busy = 0
        self._cv = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []

    # -- queue --------------------------------------------------------------------------------
    def depth(self) -> int:
        """Jobs waiting (including reserved slots), not counting jobs being encoded."""
        with self._cv:
            return len(self._jobs) + self._reserved

    def busy(self) -> int:
        with self._cv:
            return self._busy

    def is_full(self) -> bool:
        return self.depth() >= self.queue_size

    def reserve(self) -> Reservation:
        with self._cv:
            if len(self._jobs) + self._reserved >= self.queue_size:
                raise QueueFull(f"the encode queue is full ({self.queue_size} jobs waiting)")
            self._reserved += 1
        return Reservation(self)

    def _release(self) -> None:
        with self._cv:
            self._reserved -= 1

    def submit(self, job: EncodeJob, reservation: Reservation | None = None) -> None:
        """Queue `job` in a reserved slot, or unconditionally (start-up requeue) without one."""
        with self._cv:
            if reservation is not None:
                if reservation.used:
                    raise RuntimeError("reservation used twice")
                reservation.used = True
                self._reserved -= 1
            self._jobs.append(job)
            self._cv.notify()

    # -- threads ------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        for i in range(self.workers):
            t = threading.Thread(target=self._run, name=f"compass-encode-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 30.0) -> None:
        """Let running encodes finish; queued jobs stay `pending` in the database for next start."""
        with self._cv:
            self._stop = True
            self._jobs.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._jobs.popleft()
                self._busy += 1
            try:
                self._handler(job)
            except BaseException:  # the handler records failures; this only keeps the thread alive
                log.exception("encode worker: unhandled error for %s", job.image_id)
            finally:
                with self._cv:
                    self._busy -= 1


def republish_stale(db: Any, queue: Any, age_s: float) -> int:
    """Queue again the jobs of images pending and untouched for `age_s` seconds.

    A job can vanish between the row's commit and the broker (a crash in between, a broker that
    lost a message it had taken); the row says `pending` forever unless someone notices. Jobs are
    idempotent, so publishing one twice costs at most a duplicate encode.
    """
    stale = db.claim_stale(age_s)
    for image_id in stale:
        queue.submit(EncodeJob(image_id))
    if stale:
        log.warning("re-published %d job(s) pending for over %.0f s", len(stale), age_s)
    return len(stale)


class Waiters:
    """Futures for requests that wait (`wait=true`) until an image leaves `pending`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}

    def register(self, image_id: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._futures.setdefault(image_id, []).append((loop, fut))
        return fut

    def discard(self, image_id: str, fut: asyncio.Future[None]) -> None:
        with self._lock:
            items = self._futures.get(image_id, [])
            self._futures[image_id] = [(lp, f) for lp, f in items if f is not fut]
            if not self._futures[image_id]:
                del self._futures[image_id]

    def resolve(self, image_id: str) -> None:
        """Wake every waiter of `image_id` (callable from any thread)."""
        with self._lock:
            items = self._futures.pop(image_id, [])
        for loop, fut in items:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set_done, fut)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
