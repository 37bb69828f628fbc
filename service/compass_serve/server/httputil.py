"""HTTP details: byte ranges (on top of Starlette's FileResponse), validators, content negotiation.

Starlette's `FileResponse` already implements single, suffix and multiple ranges
(`multipart/byteranges`), `If-Range` against the ETag or Last-Modified, and 416. What it lacks
relative to RFC 9110 is filled in by `RangeFileResponse`:

* a syntactically invalid `Range` is ignored (full 200), where Starlette answers 400
  (RFC 9110 §14.2: a server MAY ignore Range; an invalid range-set is not an error);
* a range-set with at least one satisfiable range is served (only those ranges); Starlette
  answers 416 as soon as any one range starts past the end (§14.1.1 / §15.5.17);
* 416 is produced by the route, as a problem document with `Content-Range: bytes */len`.

`RangeFileResponse.opened` serves a file the route has already opened: FileResponse would open
its path only after the route returned, so a DELETE in between would cut the response short;
an open file survives its unlink (POSIX) and its fstat matches what is sent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

# Renditions and bitstreams never change under a URL (ids are content hashes).
IMMUTABLE = "public, max-age=31536000, immutable"


class RangeFileResponse(FileResponse):
    """FileResponse with RFC 9110 handling of invalid and partly unsatisfiable range sets."""

    _file: BinaryIO | None = None

    @classmethod
    def opened(cls, path: str | os.PathLike[str], **kwargs: Any) -> RangeFileResponse:
        """A response over `path` opened now (FileNotFoundError if it is gone); the file is
        closed when the response has been sent, or by `close` if it never is."""
        fh = Path(path).open("rb")  # noqa: SIM115 - the response owns it from here
        try:
            response = cls(path, stat_result=os.fstat(fh.fileno()), **kwargs)
        except BaseException:
            fh.close()
            raise
        response._file = fh
        return response

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[anyio.AsyncFile[bytes]]:
        if self._file is None:
            async with super()._open_file() as file:
                yield file
            return
        self._file.seek(0)  # closed by __call__, once, after every range has been read
        yield anyio.AsyncFile(self._file)

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            units, spec = http_range.split("=", 1)
        except ValueError:
            return []  # invalid: ignore the header
        if units.strip().lower() != "bytes":
            return []  # unknown range unit: ignore (§14.2)
        if spec.count(",") + 1 > cls.max_ranges:
            return []
        parts = [p.strip() for p in spec.split(",")]
        if not parts or any(not _valid_range_spec(p) for p in parts):
            return []
        # Keep only satisfiable ranges; when none is left, the whole set is unsatisfiable.
        satisfiable = [p for p in parts if _satisfiable(p, file_size)]
        if not satisfiable:
            raise RangeNotSatisfiable(file_size)
        try:
            return super()._parse_range_header("bytes=" + ",".join(satisfiable), file_size)
        except MalformedRangeHeader:
            return []

    @classmethod
    def evaluate(cls, http_range: str, file_size: int) -> list[tuple[int, int]] | None:
        """The ranges that will be served (empty list: full content), or None for 416."""
        try:
            return cls._parse_range_header(http_range, file_size)
        except RangeNotSatisfiable:
            return None


def _valid_range_spec(part: str) -> bool:
    """`first-last`, `first-` or `-suffix`, digits only, and first <= last (RFC 9110 §14.1.1)."""
    if "-" not in part:
        return False
    first, last = (s.strip() for s in part.split("-", 1))
    if not first:
        return last.isdigit()
    if not first.isdigit() or (last and not last.isdigit()):
        return False
    return not last or int(first) <= int(last)


def _satisfiable(part: str, size: int) -> bool:
    first, last = (s.strip() for s in part.split("-", 1))
    if not first:
        return int(last) > 0 and size > 0  # a suffix of length 0 selects nothing
    return int(first) < size


def strong_etag(value: str) -> str:
    return f'"{value}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2): `W/"x"` matches `"x"`; `*` matches anything."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(c.strip().removeprefix("W/") == opaque for c in if_none_match.split(","))


# -- content negotiation ----------------------------------------------------------------------------
_MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
# Server preference among equally acceptable formats: small and quick to encode first. AVIF is
# smallest but slow to encode on a CPU, so it wins only when asked for explicitly or by q-value.
PREFERENCE = ("webp", "avif", "jpeg", "png")


def media_type(fmt: str) -> str:
    return _MEDIA[fmt]


def negotiate(accept: str | None, available: tuple[str, ...]) -> str | None:
    """Pick an output format from an Accept header; None when nothing available is acceptable.

    The most specific matching media range gives a format its q-value (RFC 9110 §12.5.1); among
    equal q-values an explicitly listed type beats a wildcard match, then server preference.
    """
    order = [f for f in PREFERENCE if f in available]
    if not accept or not accept.strip():
        return order[0] if order else None
    ranges: list[tuple[str, str, float]] = []
    for item in accept.split(","):
        fields = [f.strip() for f in item.split(";")]
        mtype = fields[0].lower()
        if "/" not in mtype:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        main, _, sub = mtype.partition("/")
        ranges.append((main, sub, q))
    best: tuple[float, int, int, str] | None = None
    for rank, fmt in enumerate(order):
        main, sub = _MEDIA[fmt].split("/")
        match: tuple[int, float] | None = None  # (specificity, q)
        for rmain, rsub, q in ranges:
            if (rmain, rsub) == (main, sub):
                spec = 2
            elif (rmain, rsub) == (main, "*"):
                spec = 1
            elif (rmain, rsub) == ("*", "*"):
                spec = 0
            else:
                continue
            if match is None or spec > match[0]:
                match = (spec, q)
        if match is None or match[1] <= 0:
            continue
        score = (match[1], match[0], -rank, fmt)
        if best is None or score > best:
            best = score
    return best[3] if best else None

