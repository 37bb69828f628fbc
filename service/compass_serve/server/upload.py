"""Reading an upload body incrementally, stopping as soon as it passes the byte limit.

Accepted shapes: `multipart/form-data` with the image in the field `file` (other fields are
ignored), or the raw image as the whole body (`image/*`, `application/octet-stream`, or no
content type). Starlette's own form parser spools files of any size to disk before the handler
runs, so multipart is parsed here with python-multipart's streaming parser instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from compass_serve.server.problems import Problem

# Room for multipart boundaries, part headers and small extra fields on top of the file limit.
MULTIPART_SLACK = 64 * 1024
FILE_FIELD = "file"


def too_large(limit: int) -> Problem:
    # The rest of the body is never read by the app. uvicorn discards whatever the client still
    # sends; closing at once instead would make the kernel reset the connection and clients
    # would lose the 413 answer itself.
    return Problem(413, f"the upload is larger than the limit of {limit} bytes", code="upload_too_large")


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise Problem(400, f"invalid Content-Length header {value!r}", code="bad_request") from None


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of the request (at most `max_bytes`), or a 4xx Problem."""
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    length = _content_length(request)
    try:
        if media == "multipart/form-data":
            # A declared length that cannot fit is refused before reading a byte.
            if length is not None and length > max_bytes + MULTIPART_SLACK:
                raise too_large(max_bytes)
            return await _read_multipart(request, ctype, max_bytes)
        if media in ("", "application/octet-stream") or media.startswith("image/"):
            if length is not None and length > max_bytes:
                raise too_large(max_bytes)
            return await _read_raw(request, max_bytes)
    except ClientDisconnect:
        raise Problem(400, "the client disconnected before the upload was complete",
                      code="incomplete_upload") from None
    raise Problem(
        415, f"unsupported request content type {media!r}: send the image as multipart/form-data "
        f"field {FILE_FIELD!r} or as a raw body with an image/* content type",
        code="unsupported_media_type",
    )


async def _read_raw(request: Request, max_bytes: int) -> bytes:
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise too_large(max_bytes)
    return bytes(buf)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str | None = None
    data: bytearray = field(default_factory=bytearray)
    size: int = 0


class _Collector:
    """python-multipart callbacks that keep the first `file` part and count everything."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.part = _Part()
        self.file: bytes | None = None
        self.other_bytes = 0
        self.ended = False
        self._hname = b""
        self._hvalue = b""

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname = self._hvalue = b""

    def on_headers_finished(self) -> None:
        _disp, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        self.part.name = name.decode("utf-8", "replace") if isinstance(name, bytes) else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        keep = self.part.name == FILE_FIELD and self.file is None
        if keep:
            if self.part.size + n > self.max_bytes:
                raise too_large(self.max_bytes)
            self.part.data += data[start:end]
        else:
            # Other fields are ignored but still bounded.
            self.other_bytes += n
            if self.other_bytes > MULTIPART_SLACK:
                raise Problem(413, "multipart fields other than 'file' are too large",
                              code="upload_too_large")
        self.part.size += n

    def on_part_end(self) -> None:
        if self.part.name == FILE_FIELD and self.file is None:
            self.file = bytes(self.part.data)

    def on_end(self) -> None:
        self.ended = True


async def _read_multipart(request: Request, ctype: str, max_bytes: int) -> bytes:
    _media, params = parse_options_header(ctype)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "multipart/form-data without a boundary parameter", code="bad_multipart")
    c = _Collector(max_bytes)
    callbacks = {
        "on_part_begin": c.on_part_begin, "on_part_data": c.on_part_data, "on_part_end": c.on_part_end,
        "on_header_field": c.on_header_field, "on_header_value": c.on_header_value,
        "on_header_end": c.on_header_end, "on_headers_finished": c.on_headers_finished,
        "on_end": c.on_end,
    }
    total = 0
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + MULTIPART_SLACK:
                raise too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise Problem(400, f"malformed multipart body: {exc}", code="bad_multipart") from None
    if not c.ended:
        raise Problem(400, "the multipart body ends before its closing boundary", code="bad_multipart")
    if c.file is None:
        raise Problem(422, f"the multipart body has no field named {FILE_FIELD!r}", code="missing_file")
    return c.file
