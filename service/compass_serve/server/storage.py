"""Blob storage: a `BlobStore` protocol and its local-directory implementation (the S3 one is in
`s3store.py`; `open_store(settings)` picks by `COMPASS_BLOB_STORE`).

Writes are atomic: bytes go to a temporary file in the same file system, are fsynced, renamed
over the final name, and the directory is fsynced. A crash at any point leaves either no blob or
the whole blob, never a prefix; leftovers of interrupted writes sit in `.tmp/` and are removed by
`recover()` at start-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

_KEY = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")


class BlobNotFound(LookupError):
    """No blob is stored under the key."""


@runtime_checkable
class BlobStore(Protocol):
    """What the service needs from a blob store; an S3 backend implements the same methods."""

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` atomically (readers see all of it or nothing)."""

    def get(self, key: str) -> bytes:
        """All bytes of `key`; raises BlobNotFound."""

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes `start` (inclusive) to `end` (exclusive) of `key`; raises BlobNotFound."""

    def size(self, key: str) -> int | None:
        """Length in bytes, or None when absent."""

    def delete(self, key: str) -> bool:
        """Remove `key`; True if it existed."""

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under the folder-like `prefix` (e.g. "images/")."""

    def local_path(self, key: str) -> Path | None:
        """A file path for zero-copy serving, or None for remote stores."""

    def recover(self) -> int:
        """Clean up after interrupted writes; returns how many leftovers were removed."""


def check_key(key: str) -> str:
    """Keys are built by the service, but one escaping the store's root must be impossible anyway."""
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. platforms that cannot open directories: rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path, *, durable: bool = True) -> None:
    """Write `data` to `path` via a temporary file in `tmp_dir` (same file system) and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=path.name[:40] + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_dir(path.parent)


class LocalBlobStore:
    """Blobs as files under `root`; keys are relative paths of safe characters."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data, self.tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def read_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with self._path(key).open("rb") as fh:
                fh.seek(start)
                return fh.read(max(0, end - start))
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def keys(self, prefix: str = "") -> Iterator[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and self.tmp not in path.parents:
                yield path.relative_to(self.root).as_posix()

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def recover(self) -> int:
        removed = 0
        if self.tmp.is_dir():
            for entry in self.tmp.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed += 1
        return removed


def open_store(settings: Any) -> BlobStore:
    """The blob store the settings name (`local`: the data dir's blobs/; `s3`: a bucket)."""
    if settings.blob_store == "s3":
        from compass_serve.server.s3store import S3BlobStore

        return S3BlobStore.from_settings(settings)
    return LocalBlobStore(settings.blob_dir)
