"""The viewer in a real browser: headless Chromium (Debian's package) driven by Playwright.

Against a live server on loopback: upload through the page, wait for ready, step through the
layers checking the displayed image's natural width after each step and that the page asked for
exactly the layer table's byte ranges; responsive `srcset` choice; phone width; deletion and the
write API key. Screenshots go to tests/artifacts/ (gitignored).

Without /usr/bin/chromium or the playwright package the tests are skipped and the run ends with a
loud summary (tests/conftest.py); `COMPASS_REQUIRE_BROWSER=1` (set by .ci/run) makes that a failure.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, photo
from tests.server_harness import LiveServer, png_bytes, test_settings

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("COMPASS_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "tests" / "artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
W, H = 192, 128
LADDER = [48, 96, 192]
TIMEOUT_MS = 60_000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("COMPASS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required but cannot run: {reason}")
        pytest.skip(f"BROWSER TEST NOT RUN: {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def photo_file(tmp_path: Path) -> Path:
    path = tmp_path / "gradient.png"
    path.write_bytes(png_bytes(photo(W, H, seed=7)))
    return path


class PageLog:
    """Requests the page made (Range headers read after the fact) and anything that went wrong."""

    def __init__(self, page: Any) -> None:
        self.requests: list[Any] = []
        self.problems: list[str] = []
        page.on("request", lambda req: self.requests.append(req))
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.problems.append(f"console: {msg.text}"))
        # Chromium's console line for a failed load has no URL; this one says which request it was.
        page.on("response", lambda r: r.status >= 400
                and self.problems.append(f"http {r.status}: {r.request.method} {r.url}"))

    def bitstream_ranges(self) -> list[tuple[str, str | None]]:
        return [(r.method, r.all_headers().get("range")) for r in self.requests
                if r.url.split("?")[0].endswith("/bitstream")]


def _open(browser: Any, url: str, **context: Any) -> tuple[Any, Any, PageLog]:
    ctx = browser.new_context(**{"viewport": {"width": 1000, "height": 1200}, "device_scale_factor": 1,
                                 **context})
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    log = PageLog(page)
    page.goto(f"{url}/viewer")
    return ctx, page, log


def _upload(page: Any, path: Path, widths: str) -> None:
    page.set_input_files("#file", str(path))
    page.fill("#widths", widths)
    page.click("#upload-btn")


def _natural_width(page: Any, selector: str) -> int:
    return int(page.eval_on_selector(selector, "img => img.naturalWidth"))


def _wait_status(page: Any, prefix: str) -> None:
    page.wait_for_function(f"() => document.getElementById('status').textContent.startsWith('{prefix}')")


def _wait_count(page: Any, selector: str, n: int) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('{selector}').length === {n}")


def _set_display_width(page: Any, px: int) -> None:
    page.eval_on_selector("#display-width", """(el, px) => {
        el.value = String(px); el.dispatchEvent(new Event("input", { bubbles: true })); }""", px)


def test_upload_progressive_delivery_and_srcset(browser: Any, photo_file: Path, tiny_store: Path,
                                                tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with LiveServer(test_settings(tmp_path / "data", tiny_store)) as srv:
        ctx, page, log = _open(browser, srv.url)
        try:
            # The srcset check below goes from narrow to wide: Chromium keeps using a wider candidate
            # it already has in its memory cache, so the page must not have loaded a wide one first.
            page.eval_on_selector("#display-width", "el => { el.value = '96'; }")
            # The quality field takes its range and default from GET /model.
            with httpx.Client(base_url=srv.url) as c:
                model = c.get("/model").json()
            page.wait_for_function("() => document.getElementById('quality').max !== ''")
            assert page.get_attribute("#quality", "max") == str(model["qualities"])
            assert page.input_value("#quality") == f"{model['default_quality']:g}"
            _upload(page, photo_file, ",".join(map(str, LADDER)))
            _wait_status(page, "Ready")
            with httpx.Client(base_url=srv.url) as c:
                manifest = c.get("/images").json()["items"][0]["links"]["manifest"]
                m = c.get(manifest).json()
                costs = c.get(f"/images/{m['id']}/costs").json()
            assert m["quality"] == model["default_quality"]
            layers = m["layers"]
            assert [la["width"] for la in layers] == LADDER
            assert page.locator("#layer-table tbody tr").count() == 1 + len(LADDER)  # header + layers
            table = page.inner_text("#layer-table")
            for la in layers:
                assert f"{la['byte_start']}–{la['byte_end']}" in table

            # Step through the layers: the first with the keyboard, the rest with clicks.
            for k, la in enumerate(layers):
                if k == 0:
                    page.focus("#step")
                    page.keyboard.press("Enter")
                else:
                    page.click("#step")
                _wait_count(page, "#steps tbody tr", k + 1)
                assert _natural_width(page, "#progressive") == la["width"]
                assert page.eval_on_selector("#bytes-bar", "b => b.value") == la["byte_end"] + 1
                row = page.inner_text(f"#steps tbody tr:nth-child({k + 1})")
                assert f"{la['byte_end'] + 1:,} B" in row
                jpeg = costs["layers"][k]
                assert f"{jpeg['jpeg_bytes']:,} B / {jpeg['jpeg_bytes_cumulative']:,} B" in row
                alt = page.get_attribute("#progressive", "alt") or ""
                assert "gradient.png" in alt and f"{la['width']}×{la['height']}" in alt
            assert page.is_disabled("#step") and page.is_disabled("#play")

            # Exactly one Range request per layer, each matching the layer table; nothing else.
            expected = [("GET", f"bytes={0 if k == 0 else la['byte_start']}-{la['byte_end']}")
                        for k, la in enumerate(layers)]
            assert log.bitstream_ranges() == expected
            assert sum(int(r.split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1
                       for _, r in expected) == m["size"]  # no byte fetched twice, none missing
            page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)

            # Responsive renditions: the browser picks the candidate for width x DPR from srcset.
            for px in (96, 192):
                _set_display_width(page, px)
                page.wait_for_function(f"""() => {{ const i = document.getElementById('responsive');
                    return i.style.width === '{px}px' && i.complete && i.dataset.chosen; }}""")
                assert page.get_attribute("#responsive", "data-chosen") == str(px)
                assert _natural_width(page, "#responsive") == px
            snippet = page.input_value("#snippet")
            for w in LADDER:
                assert f"{srv.url}/images/{m['id']}?width={w} {w}w" in snippet
            assert 'sizes="(max-width: 192px) 100vw, 192px"' in snippet

            # Every form control is labelled; every shown image has alt text.
            unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select')]
                .filter(e => e.labels.length === 0).map(e => e.id)""")
            assert unlabelled == []
            no_alt = page.evaluate("""() => [...document.querySelectorAll('img')]
                .filter(i => !i.hidden && !i.alt).map(i => i.src)""")
            assert no_alt == []
            assert log.problems == []

            # Phone width: nothing wider than the viewport.
            page.set_viewport_size({"width": 375, "height": 800})
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            # ... and the tables fit too (no sideways scrolling inside their regions).
            assert page.evaluate("""() => [...document.querySelectorAll('.scroll')]
                .every(d => d.scrollWidth <= d.clientWidth)""")
            page.screenshot(path=str(ARTIFACTS / "viewer-phone.png"), full_page=True)

            # Browse and delete (the confirm dialog accepted).
            page.on("dialog", lambda d: d.accept())
            page.click("#refresh")
            item = page.locator(f"#image-list li[data-id='{m['id']}']")
            item.wait_for()
            item.get_by_role("button", name="Delete").click()
            _wait_status(page, "Deleted")
            _wait_count(page, "#image-list li", 0)
            assert page.is_visible("#list-empty")
            assert page.is_hidden("#image-section")
            with httpx.Client(base_url=srv.url) as c:
                assert c.get(f"/images/{m['id']}/manifest").status_code == 404
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "viewer-failure.png"), full_page=True)
            raise
        finally:
            ctx.close()


def test_write_api_key_from_the_page(browser: Any, photo_file: Path, tiny_store: Path,
                                     tmp_path: Path) -> None:
    settings = test_settings(tmp_path / "data", tiny_store, api_key="s3cret-key")
    with LiveServer(settings) as srv:
        ctx, page, log = _open(browser, srv.url)
        try:
            _upload(page, photo_file, "")
            page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
            assert "Write API key" in page.inner_text("#status")  # the 401 says where to put the key
            page.click("#key-box summary")
            page.fill("#api-key", "s3cret-key")
            assert page.evaluate("sessionStorage.getItem('compass-serve.api-key')") == "s3cret-key"
            # Renditions' decodes are held at a gate, so the page still waits for its pictures (the
            # responsive one, the thumbnail) when it deletes the image below: it must cancel those loads
            # first, or the 404 they would now get shows up as an error.
            svc = srv.app.state.service
            entered, gate = threading.Event(), threading.Event()
            original = svc._decode_rendition

            def held(*args: Any, **kwargs: Any) -> Any:
                entered.set()
                gate.wait(30)
                return original(*args, **kwargs)

            svc._decode_rendition = held
            page.click("#upload-btn")
            _wait_status(page, "Ready")
            posts = [r for r in log.requests if r.method == "POST"]
            assert [r.all_headers().get("x-api-key") for r in posts] == [None, "s3cret-key"]
            page.on("dialog", lambda d: d.accept())
            assert entered.wait(30)
            page.click("#delete-current")
            _wait_status(page, "Deleted")
            gate.set()
            deadline = time.monotonic() + 30
            while svc._decodes:  # the held decode has answered (its client is gone)
                assert time.monotonic() < deadline
                time.sleep(0.01)
            page.wait_for_timeout(300)  # time for a late answer to show up as a console error
            deletes = [r for r in log.requests if r.method == "DELETE"]
            assert [r.all_headers().get("x-api-key") for r in deletes] == ["s3cret-key"]
            # The 401 answer is logged by Chromium as a failed resource; nothing else may go wrong.
            assert [p for p in log.problems if "401" not in p] == []
        finally:
            ctx.close()

