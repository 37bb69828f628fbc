"""Image metadata in SQL (SQLAlchemy 2; SQLite under the data dir by default, PostgreSQL when
`COMPASS_DATABASE_URL` names one). The schema is created and upgraded by Alembic (`migrate.py`).

A row is the only thing that makes an image visible. The encode worker writes the `.cmp` blob
(atomically, fsynced) *before* it commits the row as `ready`, so no committed row ever points at
bytes that are not on disk; blobs without a row are swept at start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Integer,
    String,
    create_engine,
    delete,
    event,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

PENDING, READY, FAILED = "pending", "ready", "failed"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores no zone: assume UTC on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class ImageRecord(Base):
    """One uploaded image and, once encoded, its `.cmp` layer table."""

    __tablename__ = "images"

    # The integer key gives a stable insertion order for keyset pagination.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(String(1000), default=None)
    model: Mapped[str] = mapped_column(String(64))
    weights_id: Mapped[str] = mapped_column(String(16))
    quality: Mapped[float] = mapped_column(Float)
    widths: Mapped[list[int] | None] = mapped_column(JSON, default=None)
    scales: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    source_format: Mapped[str] = mapped_column(String(16))
    source_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size: Mapped[int | None] = mapped_column(Integer, default=None)
    etag: Mapped[str | None] = mapped_column(String(64), default=None)  # sha256 of the .cmp bytes
    header: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    encode_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Revision 0002: encodes started for this row (>1: redelivered) and the device of the last one.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    device: Mapped[str | None] = mapped_column(String(16), default=None)


class Database:
    """Engine + sessions and the handful of queries the service runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        is_sqlite = url.startswith("sqlite")
        connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": 30} if is_sqlite else {}
        if url.startswith("postgresql"):
            # Fail fast while the server is down, so requests answer 503 instead of hanging.
            connect_args["connect_timeout"] = 5
        # pre_ping: pooled connections that died with a database restart are replaced, not
        # handed to a request, so the service recovers by itself once the database is back.
        self.engine: Engine = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite allows one writer at a time; serialising writers here avoids "database is
        # locked" retries under concurrent uploads (readers are not blocked in WAL mode).
        # PostgreSQL takes concurrent writers itself (and other processes write anyway).
        self._write_lock = threading.Lock() if is_sqlite else None

    def migrate(self) -> str | None:
        """Create or upgrade the schema to the newest migration; returns the revision."""
        from compass_serve.server import migrate

        return migrate.upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        lock = self._write_lock if write and self._write_lock is not None else None
        if lock is not None:
            lock.acquire()
        try:
            with self._sessions() as s:
                yield s
        finally:
            if lock is not None:
                lock.release()

    def ping(self) -> None:
        with self.session() as s:
            s.execute(text("SELECT 1"))

    # -- queries ----------------------------------------------------------------------------------
    def get(self, image_id: str) -> ImageRecord | None:
        with self.session() as s:
            return s.scalars(select(ImageRecord).where(ImageRecord.id == image_id)).first()

    def insert(self, record: ImageRecord) -> bool:
        """Insert a new row; False if a row with that id exists already."""
        with self.session(write=True) as s:
            s.add(record)
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                return False
            return True

    def replace_failed(self, record: ImageRecord) -> bool:
        """Turn a `failed` row with the record's id into the given (pending) record."""
        with self.session(write=True) as s:
            old = s.scalars(select(ImageRecord).where(ImageRecord.id == record.id)).first()
            if old is None or old.status != FAILED:
                return False
            s.delete(old)
            s.flush()
            s.add(record)
            s.commit()
            return True

    def start_attempt(self, image_id: str, device: str) -> ImageRecord | None:
        """Count an encode attempt of a pending row; the row, or None when it is not pending."""
        with self.session(write=True) as s:
            res = s.execute(update(ImageRecord)
                            .where(ImageRecord.id == image_id, ImageRecord.status == PENDING)
                            .values(attempts=ImageRecord.attempts + 1, device=device, updated_at=utcnow()))
            s.commit()
            if not getattr(res, "rowcount", 0):
                return None
        return self.get(image_id)

    def mark_ready(
        self, image_id: str, *, size: int, etag: str, header: dict[str, Any], seconds: float
    ) -> str | None:
        """pending -> ready. Returns the status the row had (`pending` when this call made it
        ready), or None when the row is gone (deleted meanwhile)."""
        with self.session(write=True) as s:
            # FOR UPDATE: two copies of one job (a redelivery racing a slow worker) cannot both
            # see `pending` on PostgreSQL; SQLite writers are serialised anyway.
            row = s.scalars(select(ImageRecord).where(ImageRecord.id == image_id).with_for_update()).first()
            if row is None:
                return None
            if row.status != PENDING:
                return row.status
            row.status, row.reason = READY, None
            row.size, row.etag, row.header, row.encode_seconds = size, etag, header, seconds
            row.updated_at = utcnow()
            s.commit()
            return PENDING

    def set_stream(self, image_id: str, *, size: int, etag: str, header: dict[str, Any]) -> bool:
        """Make a ready row describe the stored stream; True when it described other bytes."""
        with self.session(write=True) as s:
            row = s.scalars(select(ImageRecord).where(ImageRecord.id == image_id).with_for_update()).first()
            if row is None or row.status != READY or row.etag == etag:
                return False
            row.size, row.etag, row.header, row.updated_at = size, etag, header, utcnow()
            s.commit()
            return True

    def mark_failed(self, image_id: str, reason: str, *, only_pending: bool = False) -> bool:
        """Record a failure. Encoders pass `only_pending`: a duplicate job that fails must not
        overwrite the outcome of the copy that succeeded."""
        with self.session(write=True) as s:
            row = s.scalars(select(ImageRecord).where(ImageRecord.id == image_id).with_for_update()).first()
            if row is None or (only_pending and row.status != PENDING):
                return False
            row.status, row.reason = FAILED, reason[:1000]
            row.size = row.etag = row.header = None
            row.updated_at = utcnow()
            s.commit()
            return True

    def delete(self, image_id: str) -> bool:
        with self.session(write=True) as s:
            res = s.execute(delete(ImageRecord).where(ImageRecord.id == image_id))
            s.commit()
            return bool(getattr(res, "rowcount", 0))

    def page(self, after: int | None, limit: int, status: str | None = None) -> list[ImageRecord]:
        """Up to `limit` rows in upload order, after sequence number `after` (keyset paging)."""
        q = select(ImageRecord).order_by(ImageRecord.seq).limit(limit)
        if after is not None:
            q = q.where(ImageRecord.seq > after)
        if status is not None:
            q = q.where(ImageRecord.status == status)
        with self.session() as s:
            return list(s.scalars(q))

    def all_rows(self, statuses: Sequence[str] | None = None) -> list[ImageRecord]:
        q = select(ImageRecord).order_by(ImageRecord.seq)
        if statuses is not None:
            q = q.where(ImageRecord.status.in_(list(statuses)))
        with self.session() as s:
            return list(s.scalars(q))

    def claim_stale(self, age_s: float, limit: int = 1000) -> list[str]:
        """Ids of rows pending and untouched (not started, not re-published) for `age_s` seconds:
        their job may have been lost. Claiming touches them, so each is returned once per period."""
        cutoff = utcnow() - timedelta(seconds=age_s)
        q = (select(ImageRecord.id).where(ImageRecord.status == PENDING, ImageRecord.updated_at <= cutoff)
             .order_by(ImageRecord.seq).limit(limit))
        with self.session(write=True) as s:
            ids = list(s.scalars(q))
            if ids:
                s.execute(update(ImageRecord).where(ImageRecord.id.in_(ids), ImageRecord.status == PENDING)
                          .values(updated_at=utcnow()))
                s.commit()
            return ids

    def count(self) -> int:
        with self.session() as s:
            return int(s.scalar(text("SELECT COUNT(*) FROM images")) or 0)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never wait for the writer; FULL: a committed row survives power loss, which
    # matters because a committed `ready` row is the promise that the blob is servable.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
