"""`/images` routes: upload, manifest, bitstream (byte ranges), width-matched renditions, list, delete."""

from __future__ import annotations

from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request, Security
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from compass_serve.codec.model import DEFAULT_LAMBDA
from compass_serve.server import schemas
from compass_serve.server.db import PENDING, READY
from compass_serve.server.httputil import (
    IMMUTABLE,
    RangeFileResponse,
    etag_matches,
    media_type,
    negotiate,
    strong_etag,
)
from compass_serve.server.problems import Problem, image_not_found
from compass_serve.server.security import check_api_key, require_api_key, require_signature
from compass_serve.server.service import ImageService, UploadOptions, layer_for_width, stream_key
from compass_serve.server.settings import Settings
from compass_serve.server.upload import FILE_FIELD, read_upload


def get_service(request: Request) -> ImageService:
    """The app's ImageService (dependency injection: no module-level state)."""
    return request.app.state.service  # type: ignore[no-any-return]


Svc = Annotated[ImageService, Depends(get_service)]
ImageId = Annotated[str, Path(description="image id (from the upload answer)")]
# Stateless scheme descriptions (module level so the endpoint annotations can name them).
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)
BEARER = HTTPBearer(auto_error=False)


def _p(*codes: int) -> dict[int | str, dict[str, Any]]:
    # Bodies of error responses are set to the Problem schema when the OpenAPI document is built.
    return {c: {"description": ""} for c in codes}


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object", "required": [FILE_FIELD],
                "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
            },
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
    "description": "The image, as multipart field `file` or as the raw body. The format is sniffed "
    "from the bytes; the declared content type is not trusted.",
}

# Comma-separated lists as the upload's query options accept them.
_INT_LIST = r"^\s*[0-9]{1,6}\s*(,\s*[0-9]{1,6}\s*)*$"
_NUM_LIST = r"^\s*[0-9]*\.?[0-9]+\s*(,\s*[0-9]*\.?[0-9]+\s*)*$"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_CONTENT = {m: _BINARY for m in ("image/png", "image/jpeg", "image/webp", "image/avif")}


def _parse_list(text: str | None, name: str, kind: type, limit: int) -> list[Any] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise Problem(422, f"query parameter {name}: give at least one value", code="validation_error")
    if len(items) > limit:
        raise Problem(422, f"query parameter {name}: at most {limit} layers are allowed",
                      code="validation_error")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise Problem(422, f"query parameter {name}: expected comma-separated "
                      f"{'integers' if kind is int else 'numbers'}, got {text!r}",
                      code="validation_error") from None


_CURSOR = r"^[0-9]{1,18}$"
_STATUS = "^(pending|ready|failed)$"


def pattern_hints(output_formats: tuple[str, ...]) -> dict[str, str]:
    """Human wording for the query-string patterns, used in validation problems."""
    return {
        _INT_LIST: "comma-separated integers, e.g. 192,384,768",
        _NUM_LIST: "comma-separated numbers, e.g. 0.25,0.5,1",
        _CURSOR: "a `next_cursor` value from a previous page",
        _STATUS: "one of pending, ready, failed",
        _format_pattern(output_formats): "one of " + ", ".join(output_formats),
    }


def _format_pattern(output_formats: tuple[str, ...]) -> str:
    return "^(" + "|".join(output_formats) + ")$"


def create_router(settings: Settings, output_formats: tuple[str, ...]) -> APIRouter:
    """The /images routes; limits from `settings` appear in the OpenAPI document as they are enforced."""
    router = APIRouter(tags=["images"])
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    signing_key = settings.signing_key.get_secret_value() if settings.signing_key else None
    format_pattern = _format_pattern(output_formats)

    # -- access control (dependencies exist in the schema only when configured) ---------------------
    write_deps: list[Any] = []
    read_deps: list[Any] = []
    # 401/403 are documented only where the protection that produces them is configured.
    w401 = (401,) if api_key is not None else ()
    r403 = (403,) if signing_key is not None else ()
    if api_key is not None:
        def write_access(
            key: Annotated[str | None, Security(KEY_HEADER)],
            cred: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
        ) -> None:
            auth = f"Bearer {cred.credentials}" if cred is not None else None
            require_api_key(api_key, key, auth)

        write_deps.append(Depends(write_access))
    if signing_key is not None:

        def read_access(
            request: Request,
            exp: str | None = Query(None, description="signed URL: expiry, unix seconds"),
            sig: str | None = Query(None, description="signed URL: HMAC signature"),
        ) -> None:
            # The API key holder may read without signatures.
            if api_key is not None and require_key_ok(request, api_key):
                return
            require_signature(signing_key, request.url.path, exp, sig)

        read_deps.append(Depends(read_access))

    # -- upload ------------------------------------------------------------------------------------
    @router.post(
        "/images", status_code=202, dependencies=write_deps, response_model=None,
        summary="Upload an image (encoded in the background)",
        responses={
            200: {"model": schemas.Manifest, "description": "the same upload exists and is ready"},
            201: {"model": schemas.Manifest, "description": "encoded (`wait=true`)"},
            202: {"model": schemas.UploadAccepted, "description": "queued for encoding"},
            **_p(400, *w401, 413, 415, 422, 503),
        },
        openapi_extra={"requestBody": _UPLOAD_BODY},
    )
    async def upload(
        request: Request,
        svc: Svc,
        widths: str | None = Query(
            None, pattern=_INT_LIST, examples=["192,384,768"],
            description="comma-separated layer widths, smallest first, each at most the image width",
        ),
        scales: str | None = Query(None, pattern=_NUM_LIST, examples=["0.25,0.5,1"],
                                   description="comma-separated layer scales in (0, 1], smallest first "
                                   "(not together with `widths`)"),
        quality: float | None = Query(None, ge=1, description="codec quality 1..Q, Q being the model's "
                                      "number of trained qualities (fractional allowed; `GET /model` "
                                      "gives Q); default: the level trained at lambda "
                                      f"{DEFAULT_LAMBDA:g}"),
        wait: bool = Query(False, description="answer when encoding is done (201 + manifest)"),
    ) -> Response:
        opts = UploadOptions(
            widths=_parse_list(widths, "widths", int, settings.max_layers),
            scales=_parse_list(scales, "scales", float, settings.max_layers),
            quality=quality,
        )
        if opts.widths is not None and opts.scales is not None:
            raise Problem(422, "give layer widths or layer scales, not both", code="validation_error")
        data = await read_upload(request, settings.max_upload_bytes)
        row, created = await svc.ingest(data, opts)
        if wait and row.status == PENDING:
            row = await svc.wait_for(row.id, settings.wait_timeout_s) or row
        links = schemas.links(row.id)
        if row.status == READY:
            body = schemas.manifest(row).model_dump(mode="json")
            status = 201 if created else 200
            return JSONResponse(body, status_code=status, headers={"Location": links.image})
        if row.status == PENDING:
            body = schemas.UploadAccepted(id=row.id, status="pending", manifest=links.manifest,
                                          links=links).model_dump(mode="json")
            return JSONResponse(body, status_code=202, headers={"Location": links.manifest})
        raise Problem(422, row.reason or "encoding failed", code="encode_failed", id=row.id)

    # -- manifest ----------------------------------------------------------------------------------
    @router.get(
        "/images/{image_id}/manifest", dependencies=read_deps, response_model=schemas.Manifest,
        summary="Status and layer table (byte ranges are inclusive)", responses=_p(*r403, 404),
    )
    async def get_manifest(
        svc: Svc, image_id: ImageId,
    ) -> JSONResponse:
        row = await svc.get(image_id)
        if row is None:
            raise image_not_found(image_id)
        headers = {"Cache-Control": "no-cache"}
        if row.status == PENDING:
            headers["Retry-After"] = "1"
        return JSONResponse(schemas.manifest(row).model_dump(mode="json"), headers=headers)

    # -- cost comparison (for the viewer) ------------------------------------------------------
    @router.get(
        "/images/{image_id}/costs", dependencies=read_deps, response_model=schemas.Costs,
        summary="Bytes per layer against separate JPEG/WebP renditions of the same sizes",
        responses=_p(*r403, 404, 409),
    )
    async def get_costs(svc: Svc, image_id: ImageId) -> JSONResponse:
        row = await svc.get_ready(image_id)
        return JSONResponse(schemas.costs(row).model_dump(mode="json"), headers={"Cache-Control": "no-cache"})

    # -- bitstream ---------------------------------------------------------------------------------
    bitstream_doc: dict[str, Any] = dict(
        dependencies=read_deps, response_class=Response,
        summary="The .cmp bytes, with RFC 9110 range requests",
        responses={
            200: {"description": "the whole stream", "content": {"application/octet-stream": _BINARY}},
            206: {"description": "one range, or several as multipart/byteranges",
                  "content": {"application/octet-stream": _BINARY, "multipart/byteranges": _BINARY}},
            304: {"description": "not modified (If-None-Match)"},
            **({307: {"description": "redirect to a presigned object-store URL (ranges are kept)"}}
               if settings.blob_store == "s3" and settings.s3_presign else {}),
            **_p(*r403, 404, 409, 416),
        },
    )

    @router.get("/images/{image_id}/bitstream", operation_id="get_bitstream", **bitstream_doc)
    async def get_bitstream(
        request: Request, svc: Svc, image_id: ImageId,
    ) -> Response:
        row = await svc.get_ready(image_id)
        assert row.etag is not None and row.size is not None
        etag = strong_etag(row.etag)
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        key = stream_key(image_id)
        path = svc.store.local_path(key)
        if path is None:
            return await remote_bitstream(request, svc, key, row.size, headers)
        try:
            # Opened here, not after the route returns: a DELETE from now on cannot cut it short.
            response = RangeFileResponse.opened(path, headers=headers,
                                                media_type="application/octet-stream")
        except FileNotFoundError:  # deleted since get_ready
            raise image_not_found(image_id) from None
        assert response.stat_result is not None  # opened() fstat-s the file it serves
        size = response.stat_result.st_size
        http_range = request.headers.get("range")
        if_range = request.headers.get("if-range")
        use_range = http_range is not None and (if_range is None or response._should_use_range(if_range))
        if use_range and RangeFileResponse.evaluate(http_range, size) is None:
            response.close()
            raise Problem(416, f"no requested range starts inside the {size}-byte stream",
                          code="range_not_satisfiable",
                          headers={"Content-Range": f"bytes */{size}", **headers})
        return response

    # -- renditions --------------------------------------------------------------------------------
    image_doc: dict[str, Any] = dict(
        dependencies=read_deps, response_class=Response,
        summary="The image decoded at a width (aspect kept), from the fewest layers that reach it",
        responses={
            200: {"description": "the image; `X-Compass-Layer` names the top coded layer used",
                  "content": _IMAGE_CONTENT},
            304: {"description": "not modified (If-None-Match)"},
            **_p(*r403, 404, 406, 409, 422, 503),
        },
    )

    @router.get("/images/{image_id}", operation_id="get_image", **image_doc)
    async def get_image(
        request: Request,
        svc: Svc,
        image_id: ImageId,
        width: int | None = Query(None, ge=1, le=settings.max_width,
                                  description="output width in CSS pixels; default: full size"),
        format: str | None = Query(None, pattern=format_pattern,
                                   description="output format; default: negotiated from Accept"),
        dpr: float | None = Query(None, gt=0, le=settings.max_dpr,
                                  description="device pixel ratio: the output is width x dpr pixels"),
    ) -> Response:
        row = await svc.get_ready(image_id)
        target = width if width is not None else row.width
        if dpr is not None:
            target = max(1, round(target * dpr))
            if target > settings.max_width:
                raise Problem(422, f"width x dpr = {target} exceeds the maximum width {settings.max_width}",
                              code="validation_error")
        fmt = format or negotiate(request.headers.get("accept"), output_formats)
        if fmt is None:
            raise Problem(406, f"none of the output formats ({', '.join(output_formats)}) is acceptable "
                          "per the Accept header", code="not_acceptable")
        assert row.etag is not None and row.header is not None
        # Decoding is deterministic, so (stream, width, format, quality) names the bytes exactly.
        q = "" if fmt == "png" else f"q{settings.output_quality}"
        etag = strong_etag(f"{row.etag[:24]}-{target}-{fmt}{q}")
        layer = layer_for_width(row.header["layers"], target)
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE, "Vary": "Accept",
                   "X-Compass-Layer": str(layer)}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        data, hit = await svc.rendition(row, target, fmt)
        headers["X-Compass-Cache"] = "hit" if hit else "miss"
        return Response(data, media_type=media_type(fmt), headers=headers)

    # HEAD: the same handlers (headers only), as separately named operations.
    router.add_api_route("/images/{image_id}/bitstream", get_bitstream, methods=["HEAD"],
                         operation_id="head_bitstream", **bitstream_doc)
    router.add_api_route("/images/{image_id}", get_image, methods=["HEAD"], operation_id="head_image",
                         **image_doc)

    # -- list / delete -----------------------------------------------------------------------------
    @router.get("/images", dependencies=read_deps, response_model=schemas.ImagePage,
                summary="List images in upload order (keyset pagination)", responses=_p(*r403, 422))
    async def list_images(
        svc: Svc,
        limit: int = Query(50, ge=1, le=settings.page_size_max),
        cursor: str | None = Query(None, pattern=_CURSOR, description="from `next_cursor`"),
        status: str | None = Query(None, pattern=_STATUS),
    ) -> schemas.ImagePage:
        after = int(cursor) if cursor is not None else None
        rows = await anyio.to_thread.run_sync(svc.db.page, after, limit + 1, status)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = str(rows[-1].seq) if more and rows else None
        nxt = None
        if next_cursor is not None:
            nxt = f"/images?limit={limit}&cursor={next_cursor}" + (f"&status={status}" if status else "")
        return schemas.ImagePage(items=[schemas.summary(r) for r in rows], next_cursor=next_cursor, next=nxt)

    @router.delete("/images/{image_id}", status_code=204, dependencies=write_deps, response_class=Response,
                   summary="Delete an image, its bitstream and its cached renditions",
                   responses=_p(*w401, 404))
    async def delete_image(
        svc: Svc, image_id: ImageId,
    ) -> Response:
        if not await svc.delete(image_id):
            raise image_not_found(image_id)
        return Response(status_code=204)

    return router


async def remote_bitstream(request: Request, svc: ImageService, key: str, size: int,
                           headers: dict[str, str]) -> Response:
    """The bitstream from an object store: a presigned redirect, or range GETs proxied."""
    settings = svc.settings
    presign = getattr(svc.store, "presigned_url", None)
    if settings.s3_presign and presign is not None:
        # The client repeats its Range header on the redirect; the store answers the ranges.
        url = await anyio.to_thread.run_sync(presign, key, settings.s3_presign_expiry_s)
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    http_range = request.headers.get("range")
    if_range = request.headers.get("if-range")
    ranges: list[tuple[int, int]] | None = []
    if http_range is not None and (if_range is None or etag_matches(if_range, headers["ETag"])):
        ranges = RangeFileResponse.evaluate(http_range, size)
    if ranges is None:
        raise Problem(416, f"no requested range starts inside the {size}-byte stream",
                      code="range_not_satisfiable", headers={"Content-Range": f"bytes */{size}", **headers})
    if request.method == "HEAD":
        length = sum(end - start for start, end in ranges) if len(ranges) == 1 else size
        status = 206 if len(ranges) == 1 else 200
        extra = {"Content-Range": f"bytes {ranges[0][0]}-{ranges[0][1] - 1}/{size}"} if status == 206 else {}
        return Response(status_code=status, headers={**headers, **extra, "Content-Length": str(length)},
                        media_type="application/octet-stream")
    if len(ranges) == 1:
        # One range GET to the store for exactly the bytes asked for.
        start, end = ranges[0]
        data = await anyio.to_thread.run_sync(svc.store.read_range, key, start, end)
        return Response(data, status_code=206, media_type="application/octet-stream",
                        headers={**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"})
    # No range, or several (rare for layer fetches): the whole stream in one GET.
    data = await anyio.to_thread.run_sync(svc.store.get, key)
    return Response(data, media_type="application/octet-stream", headers=headers)


def require_key_ok(request: Request, api_key: str) -> bool:
    """Whether the request carries the API key (reads past signed-URL checks)."""
    return check_api_key(api_key, request.headers.get("x-api-key"), request.headers.get("authorization"))
