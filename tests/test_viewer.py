"""The viewer page's server side, over a real socket: page and assets, no external URLs, `/costs`.

The browser itself is driven in tests/test_viewer_browser.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from compass_serve.imageio import encode_image, resize
from compass_serve.server import encoder as encoder_module
from compass_serve.server.db import ImageRecord
from compass_serve.server.routers.viewer import ASSETS_DIR, PAGE
from tests.conftest import photo
from tests.server_harness import LiveServer, held_encodes, png_bytes, test_settings, upload, wait_ready

W, H = 120, 80
LADDER = [30, 60, 120]


@pytest.fixture(scope="module")
def image(client: httpx.Client) -> dict:
    r = upload(client, png_bytes(photo(W, H, seed=3)), widths=",".join(map(str, LADDER)))
    assert r.status_code == 202, r.text
    manifest = wait_ready(client, r.json()["id"])
    assert manifest["status"] == "ready", manifest
    return manifest


# -- page and assets ------------------------------------------------------------------------------
def test_root_redirects_to_the_viewer(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/viewer"


def test_page_is_html_with_a_same_origin_policy(client: httpx.Client) -> None:
    r = client.get("/viewer")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<html lang="en">' in r.text and 'name="viewport"' in r.text
    assert '<script type="module" src="/viewer/assets/viewer.js">' in r.text


def _referenced_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/viewer/assets/[^"]+)"', html)


def test_every_referenced_asset_is_served_with_its_type(client: httpx.Client) -> None:
    html = client.get("/viewer").text
    refs = _referenced_assets(html)
    assert {"/viewer/assets/viewer.js", "/viewer/assets/viewer.css", "/viewer/assets/icon.svg"} <= set(refs)
    # ES module imports inside the scripts are assets too.
    js = client.get("/viewer/assets/viewer.js").text
    refs += ["/viewer/assets/" + m.removeprefix("./") for m in re.findall(r'from "(\./[^"]+)"', js)]
    assert "/viewer/assets/api.js" in refs
    types = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for ref in refs:
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert types[Path(ref).suffix] in r.headers["content-type"], (ref, r.headers["content-type"])
        assert "etag" in r.headers  # revalidated, not re-sent, on the next visit


def test_unknown_asset_is_a_problem_document(client: httpx.Client) -> None:
    r = client.get("/viewer/assets/nope.js")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_no_external_urls_in_the_shipped_files() -> None:
    files = [PAGE, *sorted(ASSETS_DIR.iterdir())]
    assert len(files) >= 5
    for f in files:
        text = f.read_text()
        # The SVG's XML namespace is an identifier, not something a browser fetches.
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), f.name
        assert "@import" not in text, f.name
    for js in ASSETS_DIR.glob("*.js"):
        for spec in re.findall(r'(?:from|import)\s*\(?\s*"([^"]+)"', js.read_text()):
            assert spec.startswith("./"), (js.name, spec)  # no bare or remote module specifiers


def test_the_page_is_not_in_the_openapi_document(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/viewer" not in paths and "/" not in paths
    assert "/images/{image_id}/costs" in paths


def test_viewer_can_be_switched_off(tiny_store: Path, tmp_path: Path) -> None:
    with LiveServer(test_settings(tmp_path, tiny_store, viewer=False)) as srv, srv.client() as c:
        assert c.get("/viewer").status_code == 404
        assert c.get("/viewer/assets/viewer.js").status_code == 404
        assert c.get("/healthz").status_code == 200


# -- /images/{id}/costs ------------------------------------------------------------------------------
def test_costs_set_prefix_bytes_beside_separate_renditions(client: httpx.Client, image: dict,
                                                           server: LiveServer) -> None:
    r = client.get(f"/images/{image['id']}/costs")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["recorded"] is True and body["size"] == image["size"]
    q = server.settings.output_quality
    assert body["output_quality"] == q
    original = photo(W, H, seed=3)
    assert [c["width"] for c in body["layers"]] == LADDER
    jpeg_total = webp_total = 0
    for cost, layer in zip(body["layers"], image["layers"], strict=True):
        assert cost["layer_bytes"] == layer["length"]
        assert cost["prefix_bytes"] == layer["byte_end"] + 1  # what Range: bytes=0-{byte_end} fetches
        ref = resize(original, layer["width"], layer["height"])
        assert cost["jpeg_bytes"] == len(encode_image(ref, "jpeg", quality=q))
        jpeg_total += cost["jpeg_bytes"]
        assert cost["jpeg_bytes_cumulative"] == jpeg_total
        if "webp" in server.app.state.service.output_formats:
            assert cost["webp_bytes"] == len(encode_image(ref, "webp", quality=q))
            webp_total += cost["webp_bytes"]
            assert cost["webp_bytes_cumulative"] == webp_total
    assert body["layers"][-1]["prefix_bytes"] == image["size"]


def test_costs_of_an_image_encoded_before_sizes_were_recorded(client: httpx.Client,
                                                              server: LiveServer) -> None:
    manifest = wait_ready(client, upload(client, png_bytes(photo(64, 40, seed=5))).json()["id"])
    svc = server.app.state.service
    row = svc.db.get(manifest["id"])
    # What an older server stored: the layer table without the reference sizes.
    legacy = {k: v for k, v in row.header.items() if k != "reference"}
    with svc.db.session(write=True) as s:
        s.execute(update(ImageRecord).where(ImageRecord.id == manifest["id"]).values(header=legacy))
        s.commit()
    svc._ready.pop(manifest["id"], None)  # the in-memory copy of ready rows
    body = client.get(f"/images/{manifest['id']}/costs").json()
    assert body["recorded"] is False and body["output_quality"] is None
    assert all(c["jpeg_bytes"] is None and c["webp_bytes"] is None for c in body["layers"])
    assert [c["prefix_bytes"] for c in body["layers"]] == [la["byte_end"] + 1 for la in manifest["layers"]]


def test_costs_of_unknown_and_pending_images(client: httpx.Client, server: LiveServer) -> None:
    r = client.get("/images/0123456789abcdef0123456789abcdef/costs")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    with held_encodes(server):  # the image stays observably pending
        r = upload(client, png_bytes(photo(40, 30, seed=21)))
        assert r.status_code == 202
        image_id = r.json()["id"]
        pending = client.get(f"/images/{image_id}/costs")
        assert pending.status_code == 409 and pending.json()["code"] == "not_ready"
    assert wait_ready(client, image_id, timeout=30)["status"] == "ready"
    assert client.get(f"/images/{image_id}/costs").json()["recorded"] is True


def test_a_failed_comparison_does_not_fail_the_image(client: httpx.Client,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> dict:
        raise OSError("encoder unavailable")

    # The encode job (encoder.py, shared by the in-process pool and Celery workers) measures them.
    monkeypatch.setattr(encoder_module, "reference_sizes", broken)
    manifest = wait_ready(client, upload(client, png_bytes(photo(48, 32, seed=8))).json()["id"])
    assert manifest["status"] == "ready"
    body = client.get(f"/images/{manifest['id']}/costs").json()
    assert body["recorded"] is False and body["layers"][0]["jpeg_bytes"] is None
