"""Create or upgrade the database schema through Alembic, on SQLite and PostgreSQL alike.

Several API processes and workers may start at once against one database: the upgrade runs under
a lock (a PostgreSQL transaction-level advisory lock, or a file lock next to a SQLite file), so
exactly one of them migrates and the others find the schema at head.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision that matches the schema `create_all` made before migrations existed.
BASELINE = "0001"
_PG_LOCK_KEY = 0x636F6D70  # "comp": any constant shared by every process of the deployment


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to `revision`; returns the revision the database is at afterwards."""
    with _lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Released at commit; DDL is transactional on PostgreSQL, so waiters see all or nothing.
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        cfg = alembic_config(conn)
        tables = set(inspect(conn).get_table_names())
        if "images" in tables and "alembic_version" not in tables:
            # A database made by an older build (create_all): it is the baseline revision.
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, revision)
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _lock(engine: Engine) -> Iterator[None]:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
