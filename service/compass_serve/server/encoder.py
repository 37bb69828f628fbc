"""One encode job: pending row + source blob -> `.cmp` blob -> ready row. Shared by the
in-process pool (embedded mode) and the Celery worker (scaled mode).

Idempotent by image id: a job for a row that is no longer `pending` does nothing, and a duplicate
copy racing another (redelivery after a worker died) writes the same bytes (encoding is
deterministic) and loses the `pending -> ready` race harmlessly. A failure is recorded on the row
only while it is still pending, so a late duplicate cannot overwrite a success.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image, features

from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec
from compass_serve.imageio import InputLimits, encode_image, load_rgb, resize
from compass_serve.server.db import PENDING, Database
from compass_serve.server.metrics import Metrics
from compass_serve.server.storage import BlobNotFound, BlobStore
from compass_serve.server.transient import is_transient

log = logging.getLogger("compass_serve.server")

READY_OUTCOME, FAILED_OUTCOME, SKIPPED = "ready", "failed", "skipped"


def source_key(image_id: str) -> str:
    return f"sources/{image_id}"


def stream_key(image_id: str) -> str:
    return f"images/{image_id}.cmp"


def header_json(header: bs.Header) -> dict[str, Any]:
    return {
        "header_length": header.size,
        "layers": [
            {"width": e.width, "height": e.height, "offset": e.offset, "length": e.length}
            for e in header.table
        ],
    }


def reference_formats() -> list[str]:
    """Formats the viewer compares against, as far as this Pillow can write them."""
    return [f for f in ("jpeg", "webp") if f != "webp" or features.check(f)]


def reference_sizes(image: Image.Image, header: bs.Header, quality: int,
                    formats: Sequence[str]) -> dict[str, Any]:
    """Bytes of separate renditions of the *original* at every layer's size, per format.

    What a conventional image service would send for the same widths (this server's own `?width=`
    encoder at its output quality, from the uploaded pixels rather than from a decode), so the
    viewer can set COMPASS's cumulative prefix bytes beside them. Only computable while the
    upload's pixels exist, i.e. at encode time; the result is stored with the layer table.
    """
    sizes: dict[str, list[int]] = {f: [] for f in formats}
    for entry in header.table:
        ref = image if (entry.width, entry.height) == image.size else resize(image, entry.width, entry.height)
        for f in formats:
            sizes[f].append(len(encode_image(ref, f, quality=quality)))
    return {"quality": quality, "bytes": sizes}


class TransientError(Exception):
    """A dependency (database, blob store) was unreachable: the job should be retried later."""


class Encoder:
    """Runs encode jobs against a database, a blob store and a codec."""

    def __init__(self, db: Database, store: BlobStore, codec: Callable[[], Codec | None],
                 limits: InputLimits, *, device: str = "cpu", metrics: Metrics | None = None,
                 codec_error: Callable[[], str | None] = lambda: None, reference_quality: int = 85,
                 reference_formats: Sequence[str] = (), refine_steps: int = 0) -> None:
        self.db = db
        self.store = store
        self._codec = codec
        self._codec_error = codec_error
        self.limits = limits
        self.device = device
        self.metrics = metrics
        self.reference_quality = reference_quality
        self.reference_formats = tuple(reference_formats)
        self.refine_steps = refine_steps

    def run(self, image_id: str, image: Image.Image | None = None, *, retry_transient: bool = False) -> str:
        """Encode one image; returns ready / failed / skipped.

        With `retry_transient`, an unreachable dependency raises TransientError (the caller
        retries) instead of marking the image failed.
        """
        try:
            return self._run(image_id, image)
        except Exception as exc:
            if retry_transient and is_transient(exc):
                log.warning("encode %s: %s (will retry)", image_id, exc.__class__.__name__)
                raise TransientError(f"{type(exc).__name__}: {exc}") from exc
            if isinstance(exc, ValueError | BlobNotFound):
                reason = f"encoding failed: {exc}"
            else:
                log.exception("encoding %s failed", image_id)
                reason = f"encoding failed: internal error ({type(exc).__name__})"
            self.fail(image_id, reason)
            return FAILED_OUTCOME

    def fail(self, image_id: str, reason: str) -> None:
        if self.db.mark_failed(image_id, reason, only_pending=True):
            self.store.delete(stream_key(image_id))
            self.store.delete(source_key(image_id))
        if self.metrics is not None:
            self.metrics.encodes.labels("failed").inc()

    def _run(self, image_id: str, image: Image.Image | None) -> str:
        row = self.db.start_attempt(image_id, self.device)
        if row is None:
            return SKIPPED  # deleted, or finished by another copy of the job
        codec = self._codec()
        if codec is None:
            raise RuntimeError(self._codec_error() or "the model is not loaded")
        if codec.weights_id.hex() != row.weights_id:
            raise ValueError("the server's weights changed since the upload; upload the image again")
        if image is None:
            image = load_rgb(self.store.get(source_key(image_id)), self.limits)
        t0 = time.perf_counter()
        data = codec.encode(image, widths=row.widths, scales=row.scales, quality=row.quality,
                            refine=self.refine_steps)
        seconds = time.perf_counter() - t0
        header = bs.parse_header(data)
        meta = header_json(header)
        try:
            # Kept in the header JSON (not a new column). Only the viewer's comparison needs it:
            # its failure must not fail the image.
            meta["reference"] = reference_sizes(image, header, self.reference_quality, self.reference_formats)
        except Exception:
            log.exception("comparison sizes of %s could not be measured", image_id)
        self.store.put(stream_key(image_id), data)
        before = self.db.mark_ready(image_id, size=len(data), etag=hashlib.sha256(data).hexdigest(),
                                    header=meta, seconds=seconds)
        if before is None:
            self.store.delete(stream_key(image_id))  # deleted while encoding
        elif before != PENDING:
            self._agree_with_store(image_id)
        self.store.delete(source_key(image_id))
        if before == PENDING:
            log.info("encoded %s on %s in %.2f s (attempt %d)", image_id, self.device, seconds, row.attempts)
            if self.metrics is not None:
                self.metrics.encode_seconds.observe(seconds)
                self.metrics.encodes.labels("ok").inc()
            return READY_OUTCOME
        return SKIPPED

    def _agree_with_store(self, image_id: str) -> None:
        """Another copy of this job finished first. Both wrote the stream; bytes are identical
        on one device, but cuda and cpu encodes may differ, so the row must describe whichever
        write landed last (both writes are complete by now: each precedes its `mark_ready`)."""
        try:
            stored = self.store.get(stream_key(image_id))
        except BlobNotFound:
            return
        etag = hashlib.sha256(stored).hexdigest()
        meta = header_json(bs.parse_header(stored))
        row = self.db.get(image_id)
        if row is not None and row.header and "reference" in row.header:
            meta["reference"] = row.header["reference"]  # sizes of the original: the same either way
        if self.db.set_stream(image_id, size=len(stored), etag=etag, header=meta):
            log.warning("encode %s: a duplicate job stored other bytes; manifest updated", image_id)
