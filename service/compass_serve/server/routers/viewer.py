"""The viewer page: static HTML, CSS and ES modules shipped inside the package (no build step).

The page talks to the same public API as any client (manifest, Range requests on the bitstream,
`?width=` renditions, `/costs`, list, delete), so it needs no endpoint of its own. It is kept out
of the OpenAPI document: it is a page for people, not part of the API contract.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE = STATIC_DIR / "viewer.html"
# Only the assets folder is mounted, so the page itself is always served with the headers below.
ASSETS_DIR = STATIC_DIR / "assets"
ASSETS_PATH = "/viewer/assets"

# Everything comes from this origin: the policy turns any accidental third-party URL (font, CDN
# script, analytics) into a blocked request instead of a silent leak. blob: is for the preview of
# a chosen file before upload.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny and changes with the package: revalidate (ETag) rather than cache blindly.
    "Cache-Control": "no-cache",
}


def create_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/viewer", status_code=307)

    @router.get("/viewer")
    async def viewer() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8",
                            headers=PAGE_HEADERS)

    return router


def assets() -> StaticFiles:
    """The page's CSS and JavaScript (served with ETag / Last-Modified by Starlette)."""
    return StaticFiles(directory=ASSETS_DIR, check_dir=True)
