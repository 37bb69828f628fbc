"""The SDK's one implementation, free of I/O.

Each operation is a generator ("flow") that yields what it needs done: `Send` an HTTP request,
`Decode` (CPU work), or `Emit` a result to the caller, and receives the outcome. `Client`
drives flows with blocking httpx, `AsyncClient` with async httpx (decoding in a worker thread),
so both faces share every rule: ranges, retries, error mapping, model checks.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

import httpx
from PIL import Image

from compass_serve.client.errors import (
    ModelMismatch,
    NotFound,
    NotReady,
    RequestRejected,
    ServerError,
)
from compass_serve.client.models import EncoderModel, Manifest

Source = str | os.PathLike[str] | bytes | IO[bytes] | Image.Image
RETRY_STATUS = {429, 502, 503, 504}


@dataclass(frozen=True)
class Send:
    request: httpx.Request
    expect_length: int | None = None  # a Range answer must carry exactly this many bytes


@dataclass(frozen=True)
class Reply:
    status: int
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.content)


@dataclass(frozen=True)
class Decode:
    fn: Callable[[], Any]


@dataclass(frozen=True)
class Emit:
    value: Any


Op = Send | Decode | Emit
Flow = Generator[Op, Any, Any]


@dataclass
class RetryPolicy:
    retries: int = 3
    backoff: float = 0.25          # first wait; doubles each attempt, with jitter
    max_wait: float = 30.0         # cap, also on Retry-After

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            seconds = _retry_after_seconds(retry_after)
            if seconds is not None:
                return min(self.max_wait, max(0.0, seconds))
        return min(self.max_wait, self.backoff * 2**attempt * (0.5 + random.random()))


def _retry_after_seconds(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        import datetime as dt

        when = parsedate_to_datetime(value)
        return (when - dt.datetime.now(dt.UTC)).total_seconds()
    except (TypeError, ValueError):
        return None


def should_retry(reply: Reply | None, expect_length: int | None) -> bool:
    """Transient: a retryable status, or a body shorter than the range asked for."""
    if reply is None:
        return True
    if reply.status in RETRY_STATUS:
        return True
    return bool(expect_length is not None and reply.status == 206
                and len(reply.content) < expect_length)


def problem_reason(reply: Reply) -> str:
    try:
        body = reply.json()
        return str(body.get("detail") or body.get("title") or reply.status)
    except ValueError:
        return reply.content[:200].decode("utf-8", "replace") or f"HTTP {reply.status}"


def raise_for(reply: Reply, image_id: str | None = None) -> None:
    if reply.status < 400:
        return
    reason = problem_reason(reply)
    if reply.status == 404:
        raise NotFound(f"image {image_id} not found" if image_id else reason)
    if reply.status >= 500 or reply.status == 429:
        raise ServerError(reply.status, reason)
    raise RequestRejected(reply.status, reason)


def read_source(source: Source) -> bytes:
    if isinstance(source, Image.Image):
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    return source.read()


@dataclass
class Core:
    """Request building and response interpretation shared by both clients."""

    base_url: str
    api_key: str | None = None
    model_store: Path | None = None
    _codecs: dict[tuple[str, str], Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    def request(self, method: str, path: str, **kw: Any) -> httpx.Request:
        headers = {**self.headers(), **kw.pop("headers", {})}
        req = httpx.Request(method, self.base_url.rstrip("/") + path, headers=headers, **kw)
        req.read()  # bodies held in memory, so a retry can send the same request again
        return req

    # -- codec (local decoding) -----------------------------------------------------------------
    def codec_for(self, man: Manifest) -> Any:
        from compass_serve.codec.coder import Codec
        from compass_serve.codec.registry import ModelNotFound

        key = (man.model, man.weights_id)
        if key not in self._codecs:
            try:
                self._codecs[key] = Codec.load(man.model, self.model_store,
                                               weights_id=bytes.fromhex(man.weights_id))
            except ModelNotFound as exc:
                raise ModelMismatch(
                    f"image {man.id} needs model {man.model!r} (weights {man.weights_id}), "
                    f"which this client does not have: install the compass-serve release that "
                    f"ships those weights ({exc})") from exc
        codec = self._codecs[key]
        return codec

    # -- flows ----------------------------------------------------------------------------------
    def upload(self, source: Source, widths: Sequence[int] | None, scales: Sequence[float] | None,
               quality: float | None, wait: bool) -> Flow:
        params: dict[str, str] = {}
        if widths is not None:
            params["widths"] = ",".join(str(int(w)) for w in widths)
        if scales is not None:
            params["scales"] = ",".join(f"{float(s):g}" for s in scales)
        if quality is not None:
            params["quality"] = f"{float(quality):g}"
        if wait:
            params["wait"] = "true"
        data = read_source(source)
        reply = yield Send(self.request("POST", "/images", params=params,
                                        files={"file": ("upload", data)}))
        raise_for(reply)
        body = reply.json()
        if "layers" in body:
            return Manifest.from_json(body)
        return (yield from self.manifest(body["id"]))

    def manifest(self, image_id: str) -> Flow:
        reply = yield Send(self.request("GET", f"/images/{image_id}/manifest"))
        raise_for(reply, image_id)
        return Manifest.from_json(reply.json())

    def model(self) -> Flow:
        reply = yield Send(self.request("GET", "/model"))
        raise_for(reply)
        return EncoderModel.from_json(reply.json())

    def ready_manifest(self, image_id: str) -> Flow:
        man = yield from self.manifest(image_id)
        if not man.ready:
            raise NotReady(image_id, man.status, man.reason)
        return man

    def get(self, image_id: str, width: int | None, fmt: str | None) -> Flow:
        params = {k: str(v) for k, v in (("width", width), ("format", fmt)) if v is not None}
        reply = yield Send(self.request("GET", f"/images/{image_id}", params=params))
        raise_for(reply, image_id)
        return (yield Decode(lambda: _open_image(reply.content)))

    def _range(self, image_id: str, have: bytes, need: int) -> Flow:
        """Extend `have` to `need` bytes with one Range request (or the whole body)."""
        req = self.request("GET", f"/images/{image_id}/bitstream",
                           headers={"Range": f"bytes={len(have)}-{need - 1}"})
        reply = yield Send(req, expect_length=need - len(have))
        raise_for(reply, image_id)
        if reply.status == 206:
            start = _content_range_start(reply.headers.get("content-range"))
            if start != len(have):
                raise ServerError(reply.status, f"asked for bytes from {len(have)}, got {start}")
            return have + reply.content[: need - len(have)]
        # A server that ignores Range sends everything: keep only what was asked for.
        if len(reply.content) < need:
            raise ServerError(reply.status, f"stream has {len(reply.content)} bytes, need {need}")
        return reply.content[:need]

    def fetch(self, image_id: str, width: int) -> Flow:
        _check_width(width)
        man = yield from self.ready_manifest(image_id)
        codec = self.codec_for(man)
        data = yield from self._range(image_id, b"", man.bytes_for_width(width))
        return (yield Decode(lambda: codec.decode(data, width=width).image))

    def progressive(self, image_id: str, widths: Sequence[int]) -> Flow:
        if not widths:
            return None
        for w in widths:
            _check_width(w)
        man = yield from self.ready_manifest(image_id)
        codec = self.codec_for(man)
        have = b""
        for w in widths:
            need = man.bytes_for_width(w)
            if need > len(have):  # only the bytes after those already held cross the network
                have = yield from self._range(image_id, have, need)
            data = have
            yield Emit((yield Decode(lambda data=data, w=w: codec.decode(data, width=w).image)))
        return None

    def list(self, limit: int, cursor: str | None) -> Flow:
        params = {"limit": str(limit)} | ({"cursor": cursor} if cursor else {})
        reply = yield Send(self.request("GET", "/images", params=params))
        raise_for(reply)
        return reply.json()

    def delete(self, image_id: str) -> Flow:
        reply = yield Send(self.request("DELETE", f"/images/{image_id}"))
        raise_for(reply, image_id)
        return None


def _check_width(width: int) -> None:
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/1234"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _open_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
