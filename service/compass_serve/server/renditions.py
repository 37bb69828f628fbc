"""Size-capped on-disk LRU cache of encoded renditions (decoded image at a width, in a format).

Files live at `<root>/<id[:2]>/<id>/<width>.<format>`; the index (key -> size, in recency order)
is kept in memory and rebuilt from the directory at start-up, oldest modification first. Reads
load the whole file, so an eviction racing a read can only turn a hit into a miss, never into a
half-sent response.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from compass_serve.server.storage import atomic_write


class RenditionCache:
    """LRU by bytes: `put` evicts least recently used renditions until the total fits."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.max_bytes = max_bytes
        self._index: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(image_id: str, width: int, fmt: str) -> str:
        return f"{image_id[:2]}/{image_id}/{width}.{fmt}"

    @property
    def total_bytes(self) -> int:
        return self._total

    def __len__(self) -> int:
        return len(self._index)

    def load(self, keep_ids: Iterable[str]) -> None:
        """Rebuild the index from disk, dropping renditions of images not in `keep_ids`."""
        keep = set(keep_ids)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for shard in self.root.iterdir():
            if not shard.is_dir() or shard == self.tmp:
                continue
            for image_dir in shard.iterdir():
                if image_dir.name not in keep:
                    shutil.rmtree(image_dir, ignore_errors=True)
                    continue
                for f in image_dir.iterdir():
                    st = f.stat()
                    if st.st_size == 0:  # cannot be a valid image: a write cut short
                        f.unlink(missing_ok=True)
                        continue
                    found.append((st.st_mtime, f.relative_to(self.root).as_posix(), st.st_size))
        found.sort()
        with self._lock:
            self._index.clear()
            self._total = 0
            for _mtime, key, size in found:
                self._index[key] = size
                self._total += size
        self._evict()

    def get(self, image_id: str, width: int, fmt: str) -> bytes | None:
        key = self.key(image_id, width, fmt)
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            self._forget(key)
            return None

    def put(self, image_id: str, width: int, fmt: str, data: bytes) -> None:
        if self.max_bytes <= 0 or len(data) > self.max_bytes:
            return  # caching disabled, or a rendition that would evict everything else
        key = self.key(image_id, width, fmt)
        # Not fsynced: a rendition can always be made again; load() drops empty leftovers.
        atomic_write(self.root / key, data, self.tmp, durable=False)
        with self._lock:
            self._total -= self._index.pop(key, 0)
            self._index[key] = len(data)
            self._total += len(data)
        self._evict()

    def drop_image(self, image_id: str) -> None:
        prefix = f"{image_id[:2]}/{image_id}/"
        with self._lock:
            for key in [k for k in self._index if k.startswith(prefix)]:
                self._total -= self._index.pop(key)
        shutil.rmtree(self.root / image_id[:2] / image_id, ignore_errors=True)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._total -= self._index.pop(key, 0)

    def _evict(self) -> None:
        victims: list[str] = []
        with self._lock:
            while self._total > self.max_bytes and self._index:
                key, size = self._index.popitem(last=False)
                self._total -= size
                victims.append(key)
        for key in victims:
            (self.root / key).unlink(missing_ok=True)
