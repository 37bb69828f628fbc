"""The service's state and operations, independent of HTTP routing.

One `ImageService` per app holds the settings, database, blob store, rendition cache, metrics,
the codec and the encode pool; routes reach it through FastAPI dependency injection.

Blob keys: `sources/<id>` holds an accepted upload until it is encoded (so a restart can redo
the encode); `images/<id>.cmp` holds the encoded stream. Ordering that keeps crashes harmless:
source blob -> pending row -> (encode) -> .cmp blob -> ready row -> delete source. Start-up
(`recover`) removes temporary files, requeues pending rows whose source exists, fails the rest,
and deletes blobs no row refers to.

With `queue=celery` the API process encodes nothing: jobs go to Celery workers (`jobs.py`,
`celery_worker.py`) and several API processes share the database and blob store. Start-up then
sweeps nothing (another process may be halfway through a write) and only re-publishes jobs that
have been pending for long (publishing is idempotent: jobs are keyed by image id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import torch
from PIL import Image, features

from compass_serve.codec.coder import Codec, ModelMismatch, QualityError
from compass_serve.codec.ladder import LadderError
from compass_serve.imageio import ImageInputError, InputLimits, encode_image, load_rgb, sniff_format
from compass_serve.server.db import FAILED, PENDING, READY, Database, ImageRecord, utcnow
from compass_serve.server.encoder import (
    Encoder,
    header_json,
    reference_formats,
    reference_sizes,
    source_key,
    stream_key,
)
from compass_serve.server.metrics import Metrics
from compass_serve.server.problems import Problem, image_not_found
from compass_serve.server.renditions import RenditionCache
from compass_serve.server.settings import OUTPUT_FORMATS, Settings
from compass_serve.server.storage import BlobStore, open_store
from compass_serve.server.transient import is_transient
from compass_serve.server.worker import (
    EncodeJob,
    EncodePool,
    QueueFull,
    Reservation,
    Waiters,
    republish_stale,
)

log = logging.getLogger("compass_serve.server")

ID_VERSION = 1  # bump if the id recipe changes
__all__ = ["ImageService", "header_json", "image_id_for", "layer_for_width", "reference_sizes", "source_key",
           "stream_key"]


@dataclass(frozen=True)
class UploadOptions:
    widths: list[int] | None = None
    scales: list[float] | None = None
    quality: float | None = None


@dataclass
class Prepared:
    """A validated upload, ready to be stored and queued."""

    image_id: str
    image: Image.Image
    fmt: str
    quality: float


def image_id_for(data_sha256: str, model: str, weights_hex: str, quality: float,
                 widths: Sequence[int] | None, scales: Sequence[float] | None,
                 refine_steps: int = 0) -> str:
    """Deterministic id: the same bytes with the same options, weights and encoder effort give
    the same id, so re-uploading after the server's refinement setting changes encodes anew."""
    recipe: dict[str, Any] = {
        "v": ID_VERSION, "bytes": data_sha256, "model": model, "weights": weights_hex,
        "quality": quality, "widths": list(widths) if widths is not None else None,
        "scales": [float(s) for s in scales] if scales is not None else None,
    }
    if refine_steps:  # only when set, so ids minted before the setting existed stay valid
        recipe["refine"] = refine_steps
    canon = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def layer_for_width(layers: Sequence[dict[str, Any]], width: int) -> int:
    """Fewest layers that reach `width`: the first layer at least that wide, else the top one."""
    for i, layer in enumerate(layers):
        if layer["width"] >= width:
            return i
    return len(layers) - 1


class ImageService:
    """Upload, encode, list, delete and render images; owns every stateful component."""

    def __init__(self, settings: Settings, *, store: BlobStore | None = None, queue: Any = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.db = Database(settings.db_url)
        self.store: BlobStore = store if store is not None else open_store(settings)
        # Renditions are cached on each API node's own disk, whatever the blob store.
        self.cache = RenditionCache(settings.rendition_dir, settings.rendition_cache_bytes)
        self.remote = settings.queue == "celery"
        if queue is None:
            if self.remote:
                from compass_serve.server.jobs import CeleryQueue

                queue = CeleryQueue(settings)
            else:
                queue = EncodePool(settings.encode_workers, settings.queue_size, self._encode)
        self.pool = queue
        self.waiters = Waiters()
        self.limits = InputLimits(
            max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
            max_side=settings.max_side, formats=settings.formats,
        )
        self.codec: Codec | None = None
        self.codec_error: str | None = None
        self.output_formats = tuple(
            f for f in OUTPUT_FORMATS if f not in ("webp", "avif") or features.check(f)
        )
        self.encoder = Encoder(self.db, self.store, lambda: self.codec, self.limits, metrics=self.metrics,
                               codec_error=lambda: self.codec_error,
                               reference_quality=settings.output_quality,
                               refine_steps=settings.encode_refine_steps,
                               reference_formats=[f for f in reference_formats() if f in self.output_formats])
        self._ready: OrderedDict[str, ImageRecord] = OrderedDict()  # hot metadata of ready images
        self._flights: dict[tuple[str, int, str], asyncio.Future[bytes]] = {}
        self._decodes = 0
        self._saved_threads: int | None = None
        self.decode_limiter: anyio.CapacityLimiter | None = None
        self.upload_limiter: anyio.CapacityLimiter | None = None
        self.metrics.bind_queue_depth(_zero_on_error(self.pool.depth))
        self.metrics.bind_cache_bytes(lambda: self.cache.total_bytes)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Create state, load the weights, recover from an earlier stop, start the workers."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if s.torch_threads:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(s.torch_threads)
        revision = self.db.migrate()
        log.info("database schema at revision %s", revision)
        try:
            self.codec = Codec.load(s.model, s.model_store)
            self.codec_error = None
        except (LookupError, ValueError, OSError) as exc:
            # Keep serving what can be served (lists, manifests, bitstreams); /readyz says why not ready.
            self.codec_error = f"cannot load model {s.model!r}: {exc}"
            log.error(self.codec_error)
        if self.remote:
            self._start_remote()
            return
        pending = self.recover()
        self.pool.start()
        for image_id in pending:
            self.pool.submit(EncodeJob(image_id))
        if pending:
            log.info("requeued %d pending image(s)", len(pending))

    def _start_remote(self) -> None:
        """Shared state: sweep nothing, re-publish jobs that may have been lost."""
        self.cache.load(row.id for row in self.db.all_rows([READY]))
        try:
            republish_stale(self.db, self.pool, self.settings.requeue_after_s)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("could not re-publish pending jobs now (%s); the next start-up will", exc)

    def stop(self) -> None:
        self.pool.stop()
        self.db.close()
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)

    def make_limiters(self) -> None:
        """Capacity limiters belong to the running event loop, so they are made in the lifespan."""
        self.decode_limiter = anyio.CapacityLimiter(self.settings.decode_workers)
        self.upload_limiter = anyio.CapacityLimiter(max(2, self.settings.decode_workers))

    def recover(self) -> list[str]:
        """Make disk and database agree after any kind of stop; returns ids to requeue."""
        removed = self.store.recover()
        if removed:
            log.info("removed %d interrupted blob write(s)", removed)
        requeue: list[str] = []
        ready: set[str] = set()
        pending: set[str] = set()
        for row in self.db.all_rows():
            if row.status == PENDING:
                if self.store.size(source_key(row.id)) is None:
                    self.db.mark_failed(row.id, "the upload was lost before it was encoded; upload it again")
                    continue
                pending.add(row.id)
                requeue.append(row.id)
            elif row.status == READY:
                if self.store.size(stream_key(row.id)) != row.size:
                    # Cannot happen with atomic writes unless files were removed by hand.
                    log.error("stored stream of %s is missing or damaged", row.id)
                    self.db.mark_failed(row.id, "the stored stream is missing; upload the image again")
                    continue
                ready.add(row.id)
        for key in list(self.store.keys("images/")):
            if key.removeprefix("images/").removesuffix(".cmp") not in ready:
                self.store.delete(key)  # an encode that finished but was never committed
        for key in list(self.store.keys("sources/")):
            if key.removeprefix("sources/") not in pending:
                self.store.delete(key)  # an upload whose row never committed, or already encoded
        self.cache.load(ready)
        return requeue

    # -- readiness --------------------------------------------------------------------------------
    def checks(self) -> dict[str, str]:
        out = {"weights": "ok" if self.codec is not None else (self.codec_error or "not loaded")}
        try:
            self.db.ping()
            out["database"] = "ok"
        except Exception as exc:  # any driver error means not ready
            out["database"] = f"unreachable: {type(exc).__name__}"
        if not self.remote:
            out["worker"] = "ok" if self.pool.alive() else "not running"
            return out
        out["queue"] = "ok" if self.pool.alive() else "unreachable"
        try:
            workers = self.pool.workers()
            devices = ", ".join(f"{name}={dev}" for name, dev in sorted(workers.items()))
            # Informational: without workers uploads still queue, so the API stays ready.
            out["workers"] = f"ok: {len(workers)} ({devices})" if workers else "ok: none seen yet"
        except Exception as exc:
            out["workers"] = f"ok: unknown ({type(exc).__name__})"
        return out

    def require_codec(self) -> Codec:
        if self.codec is None:
            raise Problem(503, self.codec_error or "the model is not loaded", code="not_ready",
                          headers={"Retry-After": str(self.settings.retry_after_s)})
        return self.codec

    def queue_full(self, detail: str) -> Problem:
        return Problem(503, detail, code="queue_full",
                       headers={"Retry-After": str(self.settings.retry_after_s)})

    # -- upload -----------------------------------------------------------------------------------
    def upload_id(self, data: bytes, opts: UploadOptions) -> tuple[str, float]:
        """The id an upload gets and its resolved quality (cheap: no decoding)."""
        if not data:
            raise Problem(400, "the upload is empty", code="empty_upload")
        codec = self.require_codec()
        try:
            quality = codec.check_quality(opts.quality)
        except QualityError as exc:
            raise Problem(422, str(exc), code="invalid_options") from None
        image_id = image_id_for(hashlib.sha256(data).hexdigest(), codec.name, codec.weights_id.hex(),
                                quality, opts.widths, opts.scales, self.settings.encode_refine_steps)
        return image_id, quality

    def prepare(self, data: bytes, opts: UploadOptions, image_id: str, quality: float) -> Prepared:
        """Validate an upload completely (CPU: decodes the image); raises 4xx Problems."""
        fmt = sniff_format(data)
        if fmt is None:
            raise Problem(415, "the upload is not an image in a recognised format", code="unsupported_image")
        if fmt not in self.limits.formats:
            allowed = ", ".join(sorted(self.limits.formats))
            raise Problem(415, f"image format {fmt} is not accepted (allowed: {allowed})",
                          code="unsupported_image")
        try:
            image = load_rgb(data, self.limits)
        except ImageInputError as exc:
            raise Problem(422, str(exc), code="invalid_image") from None
        try:
            ladder = self.require_codec().ladder(image, opts.widths, opts.scales)
        except LadderError as exc:
            raise Problem(422, str(exc), code="invalid_options") from None
        if len(ladder) > self.settings.max_layers:
            raise Problem(422, f"{len(ladder)} layers for a {image.width}x{image.height} image; at most "
                          f"{self.settings.max_layers} are allowed", code="invalid_options")
        return Prepared(image_id, image, fmt, quality)

    async def ingest(self, data: bytes, opts: UploadOptions) -> tuple[ImageRecord, bool]:
        """Store and queue an upload; returns (record, created). Existing ids are not redone."""
        assert self.upload_limiter is not None
        # Hashing a large upload takes a while: off the event loop, like the decoding below.
        image_id, quality = await anyio.to_thread.run_sync(self.upload_id, data, opts)
        existing = await self.get(image_id)
        if existing is not None and existing.status != FAILED:
            # The same bytes with the same options were accepted before: no new work, so this is
            # answered even when the queue is full.
            self.metrics.uploads.labels("duplicate").inc()
            return existing, False
        if self.pool.is_full():  # cheap early answer before spending CPU on decoding the upload
            raise self.queue_full("the encode queue is full; try again later")
        prep = await anyio.to_thread.run_sync(self.prepare, data, opts, image_id, quality,
                                              limiter=self.upload_limiter)
        return await anyio.to_thread.run_sync(self._store_upload, data, opts, prep)

    def _store_upload(self, data: bytes, opts: UploadOptions, prep: Prepared) -> tuple[ImageRecord, bool]:
        existing = self.db.get(prep.image_id)
        if existing is not None and existing.status != FAILED:
            self.metrics.uploads.labels("duplicate").inc()
            return existing, False
        try:
            slot: Reservation = self.pool.reserve()
        except QueueFull as exc:
            self.metrics.uploads.labels("queue_full").inc()
            raise self.queue_full(f"{exc}; try again later") from None
        created = False
        try:
            assert self.codec is not None
            self.store.put(source_key(prep.image_id), data)
            now = utcnow()
            record = ImageRecord(
                id=prep.image_id, status=PENDING, model=self.codec.name,
                weights_id=self.codec.weights_id.hex(), quality=prep.quality, widths=opts.widths,
                scales=opts.scales, source_format=prep.fmt, source_bytes=len(data),
                width=prep.image.width, height=prep.image.height, created_at=now, updated_at=now,
            )
            created = (self.db.replace_failed(record) if existing is not None
                       else self.db.insert(record))
            if not created:  # a concurrent upload of the same bytes won the race
                slot.release()
                row = self.db.get(prep.image_id)
                assert row is not None
                if row.status != PENDING:
                    # The winner may have finished and removed its source before we wrote ours.
                    self.store.delete(source_key(prep.image_id))
                return row, False
            self.pool.submit(EncodeJob(prep.image_id, prep.image), slot)
        except BaseException:
            slot.release()
            if created:
                # Not acknowledged (the job could not be queued): leave no trace of the upload.
                with contextlib.suppress(Exception):
                    self.db.delete(prep.image_id)
                    self.store.delete(source_key(prep.image_id))
            raise
        self.metrics.uploads.labels("accepted").inc()
        return record, True

    async def wait_for(self, image_id: str, timeout: float) -> ImageRecord | None:
        """Wait until the image leaves `pending` (or `timeout`); the current record."""
        if self.remote:
            return await self._poll_until_done(image_id, timeout)
        fut = self.waiters.register(image_id)
        try:
            row = await self.get(image_id)
            if row is not None and row.status == PENDING:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), timeout)
        finally:
            self.waiters.discard(image_id, fut)
        return await self.get(image_id)

    async def _poll_until_done(self, image_id: str, timeout: float) -> ImageRecord | None:
        # The encode runs in another process: nothing wakes us, so the row is polled.
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            row = await self.get(image_id)
            if row is None or row.status != PENDING or time.monotonic() >= deadline:
                return row
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    # -- encode (worker threads) ------------------------------------------------------------------
    def _encode(self, job: EncodeJob) -> None:
        try:
            self.encoder.run(job.image_id, job.image)
        finally:
            self.waiters.resolve(job.image_id)

    # -- reads ------------------------------------------------------------------------------------
    async def get(self, image_id: str) -> ImageRecord | None:
        hot = self._ready.get(image_id)
        if hot is not None:
            self._ready.move_to_end(image_id)
            return hot
        row = await anyio.to_thread.run_sync(self.db.get, image_id)
        if row is not None and row.status == READY:
            # Ready rows never change again (only deletion), so they can be cached in memory.
            self._ready[image_id] = row
            if len(self._ready) > 4096:
                self._ready.popitem(last=False)
        return row

    async def get_ready(self, image_id: str) -> ImageRecord:
        row = await self.get(image_id)
        if row is None:
            raise image_not_found(image_id)
        if row.status == PENDING:
            raise Problem(409, "the image is still being encoded; poll its manifest", code="not_ready",
                          headers={"Retry-After": "1"})
        if row.status == FAILED:
            raise Problem(409, f"the image could not be encoded: {row.reason}", code="encode_failed")
        return row

    async def delete(self, image_id: str) -> bool:
        ok = await anyio.to_thread.run_sync(self.db.delete, image_id)
        self._ready.pop(image_id, None)
        if ok:
            # Row first, then bytes: a crash in between leaves only orphans, swept at start-up.
            await anyio.to_thread.run_sync(self._delete_files, image_id)
        return ok

    def _delete_files(self, image_id: str) -> None:
        self.store.delete(stream_key(image_id))
        self.store.delete(source_key(image_id))
        self.cache.drop_image(image_id)

    # -- renditions -------------------------------------------------------------------------------
    async def rendition(self, row: ImageRecord, width: int, fmt: str) -> tuple[bytes, bool]:
        """Encoded image bytes for (row, width, fmt) and whether they came from the cache."""
        cached = self.cache.get(row.id, width, fmt)
        self.metrics.cache_lookup(cached is not None)
        if cached is not None:
            return cached, True
        key = (row.id, width, fmt)
        flight = self._flights.get(key)
        if flight is not None:  # the same rendition is being made: share it
            return await asyncio.shield(flight), False
        if self._decodes >= self.settings.decode_workers + self.settings.decode_queue_size:
            raise Problem(503, "too many renditions are being decoded; try again later",
                          code="decode_queue_full", headers={"Retry-After": str(self.settings.retry_after_s)})
        assert self.decode_limiter is not None
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        self._flights[key] = fut
        self._decodes += 1
        try:
            data = await anyio.to_thread.run_sync(self._render, row, width, fmt, limiter=self.decode_limiter)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        else:
            fut.set_result(data)
            return data, False
        finally:
            self._decodes -= 1
            del self._flights[key]

    def codec_for(self, row: ImageRecord) -> Codec:
        """The codec for a stored image: the served weights, or the archived version that coded it
        (images stored before the weights were retrained stay decodable)."""
        codec = self.require_codec()
        if row.weights_id == codec.weights_id.hex() and row.model == codec.name:
            return codec
        try:
            return Codec.load(row.model, self.settings.model_store, bytes.fromhex(row.weights_id))
        except LookupError as exc:
            raise Problem(409, f"the image was encoded with weights this server does not have: {exc}",
                          code="model_mismatch") from None

    def _render(self, row: ImageRecord, width: int, fmt: str) -> bytes:
        try:
            data = self._decode_rendition(row, width, fmt)
        except Exception:
            # A delete can land between get_ready and the read of the stream: that is a 404, not a
            # failure of the decoder (or, offloaded, of a worker).
            if self.db.get(row.id) is None:
                raise Problem(404, f"image {row.id!r} was deleted while it was being decoded",
                              code="not_found") from None
            raise
        self.cache.put(row.id, width, fmt, data)
        if self.db.get(row.id) is None:
            # Deleted while decoding: delete() drops the cache after the row, so a put that came after
            # that drop would outlive the image. The row is gone first, so this check sees it.
            self.cache.drop_image(row.id)
        return data

    def _decode_rendition(self, row: ImageRecord, width: int, fmt: str) -> bytes:
        codec = self.codec_for(row)
        assert row.header is not None
        layers = row.header["layers"]
        k = layer_for_width(layers, width)
        end = layers[k]["offset"] + layers[k]["length"]
        t0 = time.perf_counter()
        quality = None if fmt == "png" else self.settings.output_quality
        if self.remote and self.settings.decode_offload:
            # A worker (with the GPU) decodes; the answer is cached on this node like any other.
            try:
                data = self.pool.render(row.id, end, width, fmt, quality, self.settings.wait_timeout_s,
                                        model=row.model, weights_id=row.weights_id)
            except Exception as exc:
                if is_transient(exc):
                    raise
                # No worker answered in time, or the worker failed: a temporary condition here.
                log.warning("offloaded decode of %s at %d failed: %s", row.id, width, type(exc).__name__)
                raise Problem(503, "no worker could decode this rendition now; try again later",
                              code="decode_unavailable",
                              headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        else:
            # Only the prefix up to layer k is read: that is all the decoder needs.
            prefix = self.store.read_range(stream_key(row.id), 0, end)
            try:
                out = codec.decode(prefix, width=width)
            except ModelMismatch as exc:
                raise Problem(409, f"the image was encoded with other weights than this server holds: "
                              f"{exc}", code="model_mismatch") from None
            data = encode_image(out.image, fmt, quality=quality)
        self.metrics.decode_seconds.observe(time.perf_counter() - t0)
        return data


def _zero_on_error(fn: Callable[[], int]) -> Callable[[], int]:
    """A metrics gauge must not fail the scrape while the broker is unreachable."""

    def safe() -> int:
        try:
            return fn()
        except Exception:
            return 0

    return safe
