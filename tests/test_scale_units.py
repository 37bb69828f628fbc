"""Scale-out building blocks without servers: idempotent jobs, lost-job sweep, outage classification."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import sqlalchemy.exc
from botocore.exceptions import EndpointConnectionError

from compass_serve.codec.coder import Codec
from compass_serve.imageio import InputLimits
from compass_serve.server.db import FAILED, PENDING, READY, Database, ImageRecord, utcnow
from compass_serve.server.encoder import FAILED_OUTCOME, READY_OUTCOME, SKIPPED, Encoder, TransientError
from compass_serve.server.service import ImageService, UploadOptions, image_id_for, source_key, stream_key
from compass_serve.server.settings import Settings
from compass_serve.server.storage import LocalBlobStore
from compass_serve.server.transient import is_transient
from compass_serve.server.worker import EncodeJob, republish_stale
from tests.conftest import photo
from tests.server_harness import png_bytes

LIMITS = InputLimits(max_bytes=1 << 22, max_pixels=1 << 22, max_side=4096, formats=frozenset({"PNG"}))


@pytest.fixture()
def parts(tmp_path: Path, tiny_codec: Codec) -> tuple[Database, LocalBlobStore, Encoder]:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    store = LocalBlobStore(tmp_path / "blobs")
    return db, store, Encoder(db, store, lambda: tiny_codec, LIMITS)


def _pending(db: Database, store: LocalBlobStore, codec: Codec, seed: int = 0) -> str:
    data = png_bytes(photo(40, 30, seed=seed))
    iid = image_id_for(hashlib.sha256(data).hexdigest(), "tiny", codec.weights_id.hex(), 3.0, None, None)
    store.put(source_key(iid), data)
    db.insert(ImageRecord(id=iid, status=PENDING, model="tiny", weights_id=codec.weights_id.hex(),
                          quality=3.0, source_format="PNG", source_bytes=len(data), width=40, height=30))
    return iid


def test_a_job_runs_once_however_often_it_is_delivered(parts: tuple, tiny_codec: Codec) -> None:
    db, store, enc = parts
    iid = _pending(db, store, tiny_codec)
    assert enc.run(iid) == READY_OUTCOME
    stream = store.get(stream_key(iid))
    assert enc.run(iid) == SKIPPED and enc.run(iid, retry_transient=True) == SKIPPED
    row = db.get(iid)
    assert row is not None and row.status == READY and row.attempts == 1
    assert store.get(stream_key(iid)) == stream and store.size(source_key(iid)) is None


def test_the_refinement_setting_reaches_the_encoder(tmp_path: Path, tiny_codec: Codec,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(encode_refine_steps=3)
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    db.migrate()
    store = LocalBlobStore(tmp_path / "blobs")
    enc = Encoder(db, store, lambda: tiny_codec, LIMITS, refine_steps=settings.encode_refine_steps)
    seen: list[int] = []
    real = Codec.encode

    def spy(self: Codec, image, **kw):  # type: ignore[no-untyped-def]
        seen.append(kw["refine"])
        return real(self, image, **kw)

    monkeypatch.setattr(Codec, "encode", spy)
    iid = _pending(db, store, tiny_codec)
    assert enc.run(iid) == READY_OUTCOME and seen == [3]
    assert tiny_codec.decode(store.get(stream_key(iid))).image.size == (40, 30)
    with pytest.raises(ValueError):
        Settings(encode_refine_steps=-1)


def test_the_refinement_setting_is_part_of_the_upload_id(tmp_path: Path, tiny_codec: Codec) -> None:
    """Re-uploading after the effort changes must encode anew, not return the old stream."""
    data = png_bytes(photo(40, 30, seed=0))
    ids = []
    for steps in (0, 5):
        svc = ImageService(Settings(data_dir=tmp_path / str(steps), encode_refine_steps=steps))
        svc.codec = tiny_codec
        iid, quality = svc.upload_id(data, UploadOptions())
        ids.append(iid)
    assert ids[0] != ids[1]
    # the default effort mints the same ids as before the setting existed
    assert ids[0] == image_id_for(hashlib.sha256(data).hexdigest(), tiny_codec.name,
                                  tiny_codec.weights_id.hex(), quality, None, None)


def test_a_late_failing_duplicate_does_not_undo_a_success(parts: tuple, tiny_codec: Codec) -> None:
    db, store, enc = parts
    iid = _pending(db, store, tiny_codec)
    assert enc.run(iid) == READY_OUTCOME
    enc.fail(iid, "encoding failed: a duplicate lost its source")
    row = db.get(iid)
    assert row is not None and row.status == READY and store.size(stream_key(iid)) == row.size


def test_duplicate_with_other_bytes_makes_the_manifest_match_the_store(parts: tuple,
                                                                       tiny_codec: Codec) -> None:
    """A cuda and a cpu copy of one job may store different bytes: the row follows the last write."""
    db, store, enc = parts
    iid = _pending(db, store, tiny_codec)
    assert enc.run(iid) == READY_OUTCOME
    other = tiny_codec.encode(photo(40, 30, seed=0), quality=2.0)  # stands in for the other device's bytes
    store.put(stream_key(iid), other)
    enc._agree_with_store(iid)
    row = db.get(iid)
    assert row is not None and row.etag == hashlib.sha256(other).hexdigest() and row.size == len(other)


def test_outage_is_retried_not_recorded_as_failure(parts: tuple, tiny_codec: Codec,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    db, store, enc = parts
    iid = _pending(db, store, tiny_codec)

    def down(*_a: object) -> bytes:
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(store, "get", down)
    with pytest.raises(TransientError):
        enc.run(iid, retry_transient=True)
    row = db.get(iid)
    assert row is not None and row.status == PENDING and store.size(source_key(iid)) is not None
    # Embedded mode has no retry loop: the same error fails the image, with a reason.
    assert enc.run(iid) == FAILED_OUTCOME
    row = db.get(iid)
    assert row is not None and row.status == FAILED
    assert "internal error (OperationalError)" in (row.reason or "")


def test_lost_jobs_are_republished_once_per_period(parts: tuple, tiny_codec: Codec) -> None:
    db, store, _enc = parts
    old, fresh = _pending(db, store, tiny_codec, 1), _pending(db, store, tiny_codec, 2)
    with db.session(write=True) as s:
        row = s.get(ImageRecord, db.get(old).seq)  # type: ignore[union-attr]
        assert row is not None
        row.updated_at = utcnow() - timedelta(minutes=30)
        s.commit()

    class Recorder:
        def __init__(self) -> None:
            self.jobs: list[str] = []

        def submit(self, job: EncodeJob) -> None:
            self.jobs.append(job.image_id)

    q = Recorder()
    assert republish_stale(db, q, 600) == 1 and q.jobs == [old]
    assert republish_stale(db, q, 600) == 0  # claimed: not again until another period passes
    assert fresh not in q.jobs


def test_outage_errors_are_transient() -> None:
    assert is_transient(sqlalchemy.exc.OperationalError("x", {}, Exception("down")))
    assert is_transient(redis.exceptions.ConnectionError("down"))
    assert is_transient(EndpointConnectionError(endpoint_url="http://s3"))
    assert not is_transient(ValueError("bad image"))
    assert not is_transient(sqlalchemy.exc.IntegrityError("x", {}, Exception("duplicate")))


def test_scaled_shape_is_switched_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Settings().queue, Settings().blob_store, Settings().database_url) == ("local", "local", None)
    monkeypatch.setenv("COMPASS_QUEUE", "celery")
    monkeypatch.setenv("COMPASS_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("COMPASS_DATABASE_URL", "postgresql+psycopg://u@db/compass")
    monkeypatch.setenv("COMPASS_BLOB_STORE", "s3")
    monkeypatch.setenv("COMPASS_S3_PRESIGN", "true")
    s = Settings()
    assert (s.queue, s.broker_url, s.db_url, s.blob_store, s.s3_presign) == (
        "celery", "redis://redis:6379/0", "postgresql+psycopg://u@db/compass", "s3", True)
