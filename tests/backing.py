"""Real PostgreSQL and Redis servers for the scale-out tests: throw-away instances on loopback.

Each server runs from the Debian packages' binaries in a temporary directory on a free port, is
stopped and restarted by the outage tests, and is removed afterwards. When a binary is missing the
tests skip with the reason, unless COMPASS_REQUIRE_SERVERS=1 (set by `.ci/run`, which installs
them), where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(what: str) -> None:
    """Skip (or, under CI, fail) because a server binary is not installed."""
    reason = f"{what} is not installed (apt-get install postgresql redis-server; .ci/run does)"
    if os.environ.get("COMPASS_REQUIRE_SERVERS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.05)


class PostgresServer:
    """A PostgreSQL cluster in a temporary directory (run as the `postgres` user when we are root)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or ([shutil.which("initdb")]
                                                                          if shutil.which("initdb") else [])
        if not found:
            missing("PostgreSQL")
        self.bin = Path(str(found[-1])).parent
        self.port = free_port()
        # Not under pytest's tmp_path: the `postgres` user must be able to enter the directory.
        self.root = Path(tempfile.mkdtemp(prefix="compass-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:  # initdb refuses to run as root
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "compass", "--auth=trust",
                   "-E", "UTF8", "--no-sync"])

    def _run(self, cmd: list[str]) -> None:
        subprocess.run(cmd, check=True, capture_output=True, user=self.user, cwd=self.root)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://compass@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://compass@127.0.0.1:{self.port}/{name}"

    def start(self) -> PostgresServer:
        with self.log.open("ab") as out:
            # fsync off: these clusters are thrown away; clean stops still flush every commit.
            self.proc = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, user=self.user, cwd=self.root)
        _wait_port(self.port, self.proc, self.log)
        deadline = time.monotonic() + 30
        while subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, committed work is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(60)
        self.proc = None

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=compass dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class ExternalPostgres:
    """A PostgreSQL server someone else runs (CI: `.ci/run` starts Debian's cluster); never stopped here.

    Named by COMPASS_TEST_DATABASE_URL, a superuser's URL to its `postgres` database.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    def create_database(self, name: str) -> str:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(self.url)
        with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                             dbname=u.database or "postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return u.set(database=name).render_as_string(hide_password=False)

    def close(self) -> None:
        pass


class RedisServer:
    """redis-server with an append-only file, so a restart keeps queued jobs (as in production)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            missing("Redis")
        self.exe = str(exe)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="compass-redis-"))
        self.log = self.root / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        _wait_port(self.port, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes the append-only file and exits
            self.proc.wait(60)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
