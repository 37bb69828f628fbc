"""`Client` (blocking) and `AsyncClient`: thin drivers of the flows in `core`.

    with Client("http://127.0.0.1:8000") as c:
        info = c.upload("photo.jpg")
        thumb = c.fetch(info.id, width=320)            # header + the layers 320 px needs
        for img in c.progressive(info.id, [160, 640, 1280]):
            show(img)                                  # each step fetches only new bytes
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from compass_serve.client.core import (
    Core,
    Decode,
    Emit,
    Flow,
    Reply,
    RetryPolicy,
    Send,
    Source,
    should_retry,
)
from compass_serve.client.errors import TransportError, TruncatedResponse
from compass_serve.client.models import EncoderModel, ImageInfo, Manifest

DEFAULT_URL = "http://127.0.0.1:8000"
TRANSIENT = (httpx.TransportError,)  # connect/read/write errors, timeouts, broken bodies

ByteCallback = Callable[[int], None]


def _finish(reply: Reply | None, exc: Exception | None, send: Send) -> Reply:
    """What to raise when the retries are spent."""
    if reply is None:
        raise TransportError(f"{send.request.method} {send.request.url}: {exc}") from exc
    if send.expect_length is not None and reply.status == 206 \
            and len(reply.content) < send.expect_length:
        raise TruncatedResponse(
            f"{send.request.url}: got {len(reply.content)} of {send.expect_length} bytes")
    return reply  # a retryable status: the flow maps it to ServerError


class _Base:
    def __init__(self, base_url: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 0.25,
                 max_retry_wait: float = 30.0, model_store: Path | None = None,
                 **httpx_kwargs: Any) -> None:
        url = base_url or os.environ.get("COMPASS_URL", DEFAULT_URL)
        self._core = Core(url, api_key or os.environ.get("COMPASS_API_KEY"), model_store)
        self.retry = RetryPolicy(retries, backoff, max_retry_wait)
        self.on_bytes: ByteCallback | None = None  # progress hook: called with each chunk size
        self._http = self._make_http(timeout=timeout, **httpx_kwargs)

    def _make_http(self, **kwargs: Any) -> Any:
        raise NotImplementedError


class Client(_Base):
    """Blocking client; owns an `httpx.Client` connection pool. Use as a context manager."""

    _http: httpx.Client

    def _make_http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(**kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- driver ---------------------------------------------------------------------------------
    def _send_once(self, send: Send) -> Reply:
        r = self._http.send(send.request, stream=True)
        try:
            chunks = []
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                if self.on_bytes:
                    self.on_bytes(len(chunk))
            return Reply(r.status_code, r.headers, b"".join(chunks))
        finally:
            r.close()

    def _send(self, send: Send) -> Reply:
        reply: Reply | None = None
        exc: Exception | None = None
        for attempt in range(self.retry.retries + 1):
            try:
                reply, exc = self._send_once(send), None
            except TRANSIENT as e:
                reply, exc = None, e
            if not should_retry(reply, send.expect_length) or attempt == self.retry.retries:
                break
            time.sleep(self.retry.delay(attempt, reply.headers.get("retry-after") if reply else None))
        return _finish(reply, exc, send)

    def _steps(self, flow: Flow, result: list[Any] | None = None) -> Iterator[Any]:
        value: Any = None
        try:
            while True:
                op = flow.send(value)
                if isinstance(op, Send):
                    value = self._send(op)
                elif isinstance(op, Decode):
                    value = op.fn()
                elif isinstance(op, Emit):
                    yield op.value
                    value = None
        except StopIteration as stop:
            if result is not None:
                result.append(stop.value)

    def _run(self, flow: Flow) -> Any:
        result: list[Any] = []
        for _ in self._steps(flow, result):
            pass
        return result[0]

    # -- API --------------------------------------------------------------------------------------
    def upload(self, source: Source, *, widths: Sequence[int] | None = None,
               scales: Sequence[float] | None = None, quality: float | None = None,
               wait: bool = True) -> ImageInfo:
        """Upload a path, bytes, file object or PIL image; returns its manifest."""
        return self._run(self._core.upload(source, widths, scales, quality, wait))

    def manifest(self, image_id: str) -> Manifest:
        return self._run(self._core.manifest(image_id))

    def model(self) -> EncoderModel:
        """The server's encoder model: quality range and default for `upload`."""
        return self._run(self._core.model())

    def get(self, image_id: str, width: int | None = None, format: str | None = None) -> Image.Image:
        """The server decodes: an image exactly `width` wide (full size without)."""
        return self._run(self._core.get(image_id, width, format))

    def fetch(self, image_id: str, width: int) -> Image.Image:
        """The client decodes: one Range request for the header and the layers `width` needs."""
        return self._run(self._core.fetch(image_id, width))

    def progressive(self, image_id: str, widths: Sequence[int]) -> Iterator[Image.Image]:
        """Yield an image per width; each step requests only the bytes not yet held."""
        return self._steps(self._core.progressive(image_id, list(widths)))

    def list(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return self._run(self._core.list(limit, cursor))

    def delete(self, image_id: str) -> None:
        self._run(self._core.delete(image_id))


class AsyncClient(_Base):
    """Asynchronous client; owns an `httpx.AsyncClient`. Decoding runs in a worker thread."""

    _http: httpx.AsyncClient

    def _make_http(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send_once(self, send: Send) -> Reply:
        r = await self._http.send(send.request, stream=True)
        try:
            chunks = []
            async for chunk in r.aiter_bytes():
                chunks.append(chunk)
                if self.on_bytes:
                    self.on_bytes(len(chunk))
            return Reply(r.status_code, r.headers, b"".join(chunks))
        finally:
            await r.aclose()

    async def _send(self, send: Send) -> Reply:
        reply: Reply | None = None
        exc: Exception | None = None
        for attempt in range(self.retry.retries + 1):
            try:
                reply, exc = await self._send_once(send), None
            except TRANSIENT as e:
                reply, exc = None, e
            if not should_retry(reply, send.expect_length) or attempt == self.retry.retries:
                break
            await asyncio.sleep(
                self.retry.delay(attempt, reply.headers.get("retry-after") if reply else None))
        return _finish(reply, exc, send)

    async def _steps(self, flow: Flow, result: list[Any] | None = None) -> AsyncIterator[Any]:
        value: Any = None
        try:
            while True:
                op = flow.send(value)
                if isinstance(op, Send):
                    value = await self._send(op)
                elif isinstance(op, Decode):
                    value = await asyncio.to_thread(op.fn)
                elif isinstance(op, Emit):
                    yield op.value
                    value = None
        except StopIteration as stop:
            if result is not None:
                result.append(stop.value)

    async def _run(self, flow: Flow) -> Any:
        result: list[Any] = []
        async for _ in self._steps(flow, result):
            pass
        return result[0]

    async def upload(self, source: Source, *, widths: Sequence[int] | None = None,
                     scales: Sequence[float] | None = None, quality: float | None = None,
                     wait: bool = True) -> ImageInfo:
        return await self._run(self._core.upload(source, widths, scales, quality, wait))

    async def manifest(self, image_id: str) -> Manifest:
        return await self._run(self._core.manifest(image_id))

    async def model(self) -> EncoderModel:
        return await self._run(self._core.model())

    async def get(self, image_id: str, width: int | None = None,
                  format: str | None = None) -> Image.Image:
        return await self._run(self._core.get(image_id, width, format))

    async def fetch(self, image_id: str, width: int) -> Image.Image:
        return await self._run(self._core.fetch(image_id, width))

    def progressive(self, image_id: str, widths: Sequence[int]) -> AsyncIterator[Image.Image]:
        return self._steps(self._core.progressive(image_id, list(widths)))

    async def list(self, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        return await self._run(self._core.list(limit, cursor))

    async def delete(self, image_id: str) -> None:
        await self._run(self._core.delete(image_id))


