"""Alembic migrations: the one schema history SQLite and PostgreSQL share."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from compass_serve.server import migrate
from compass_serve.server.db import PENDING, READY, Base, Database, ImageRecord
from tests.backing import ExternalPostgres, PostgresServer

# The `images` table exactly as builds before migrations created it (Base.metadata.create_all).
LEGACY_SCHEMA = """
CREATE TABLE images (
    seq INTEGER NOT NULL, id VARCHAR(64) NOT NULL, status VARCHAR(16) NOT NULL, reason VARCHAR(1000),
    model VARCHAR(64) NOT NULL, weights_id VARCHAR(16) NOT NULL, quality FLOAT NOT NULL, widths JSON,
    scales JSON, source_format VARCHAR(16) NOT NULL, source_bytes INTEGER NOT NULL, width INTEGER NOT NULL,
    height INTEGER NOT NULL, size INTEGER, etag VARCHAR(64), header JSON, encode_seconds FLOAT,
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY (seq)
);
CREATE UNIQUE INDEX ix_images_id ON images (id);
CREATE INDEX ix_images_status ON images (status);
"""


def _record(image_id: str, status: str = PENDING) -> ImageRecord:
    return ImageRecord(id=image_id, status=status, model="tiny", weights_id="ab" * 8, quality=3.0,
                       source_format="PNG", source_bytes=10, width=8, height=8)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'compass.db'}"
    pg: PostgresServer | ExternalPostgres = request.getfixturevalue("pg_server")
    return pg.create_database(f"m_{uuid.uuid4().hex[:12]}")


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    db = Database(database_url)
    try:
        assert db.migrate() == migrate.head()
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        assert db.migrate() == migrate.head()  # running again changes nothing
        assert db.insert(_record("a" * 32)) and not db.insert(_record("a" * 32))  # unique ids kept
        assert db.get("a" * 32).attempts == 0  # type: ignore[union-attr]
    finally:
        db.close()


def test_legacy_sqlite_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "compass.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(LEGACY_SCHEMA)
        conn.execute("INSERT INTO images (id, status, model, weights_id, quality, source_format, "
                     "source_bytes, width, height, size, created_at, updated_at) VALUES ('old', 'ready', "
                     "'lite', '00', 3.0, 'PNG', 5, 4, 4, 77, '2025-01-01 00:00:00', '2025-01-01 00:00:00')")
    db = Database(f"sqlite:///{path}")
    try:
        assert migrate.current(db.engine) is None
        assert db.migrate() == migrate.head()
        row = db.get("old")
        assert row is not None and row.status == READY and row.size == 77 and row.attempts == 0
        columns = {c["name"] for c in inspect(db.engine).get_columns("images")}
        assert {"attempts", "device"} <= columns
    finally:
        db.close()


def test_downgrade_then_upgrade_keeps_rows(database_url: str) -> None:
    db = Database(database_url)
    try:
        db.migrate()
        db.insert(_record("b" * 32))
        with db.engine.begin() as conn:
            command.downgrade(migrate.alembic_config(conn), migrate.BASELINE)
        columns = {c["name"] for c in inspect(db.engine).get_columns("images")}
        assert "attempts" not in columns
        assert db.migrate() == migrate.head()
        assert db.get("b" * 32) is not None
    finally:
        db.close()


def test_concurrent_start_ups_migrate_once(pg_server: PostgresServer | ExternalPostgres) -> None:
    """Several processes starting at once against one empty database: all reach head, no errors."""
    url = pg_server.create_database(f"c_{uuid.uuid4().hex[:12]}")
    dbs = [Database(url) for _ in range(4)]
    errors: list[BaseException] = []
    results: list[str | None] = []
    barrier = threading.Barrier(len(dbs))

    def run(db: Database) -> None:
        barrier.wait()
        try:
            results.append(db.migrate())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and results == [migrate.head()] * len(dbs)
        with dbs[0].engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
    finally:
        for db in dbs:
            db.close()
