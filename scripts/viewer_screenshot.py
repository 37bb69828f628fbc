"""Screenshot of the viewer for the README (docs/viewer.png): shipped weights, one Kodak image.

Starts the service on loopback (temporary data dir, shipped `lite` weights), opens the viewer in
headless Debian Chromium, uploads the image through the page, plays every layer and saves a
full-page screenshot.

    .venv/bin/python scripts/viewer_screenshot.py [--image ../shared/data/kodak/kodim23.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from compass_serve.server import Settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.server_harness import LiveServer  # noqa: E402
from tests.test_viewer_browser import CHROMIUM, LAUNCH_ARGS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--image", default=str(REPO.parent / "shared/data/kodak/kodim23.png"))
    ap.add_argument("--out", default=str(REPO / "docs/viewer.png"))
    ap.add_argument("--display-width", type=int, default=384)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LiveServer(Settings(data_dir=Path(tmp))) as srv, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1000, "height": 1200}, device_scale_factor=1)
        page.set_default_timeout(300_000)
        page.goto(f"{srv.url}/viewer")
        page.eval_on_selector("#display-width", "(el, w) => { el.value = String(w); }", a.display_width)
        page.set_input_files("#file", a.image)
        page.click("#upload-btn")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Ready')")
        page.click("#play")
        # One step row per layer (the layer table has a header row besides the layers).
        page.wait_for_function("() => document.querySelectorAll('#steps tbody tr').length === "
                               "document.querySelectorAll('#layer-table tbody tr').length - 1")
        page.wait_for_function("() => document.getElementById('responsive').dataset.chosen")
        page.wait_for_function("() => [...document.querySelectorAll('#image-list img')]"
                               ".every(i => i.complete)")
        page.screenshot(path=a.out, full_page=True)
        browser.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
