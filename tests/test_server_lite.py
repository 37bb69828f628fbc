"""The service on the shipped `lite` weights, on its embedded defaults."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from compass_serve.codec.coder import Codec
from compass_serve.evaluation.run import psnr
from compass_serve.imageio import fit_width
from tests.conftest import KODAK
from tests.server_harness import LiveServer, png_bytes

pytestmark = pytest.mark.slow


def test_lite_upload_ranges_and_widths(tmp_path: Path) -> None:
    from compass_serve.server import Settings

    source = KODAK / "kodim23.png"
    original = Image.open(source).convert("RGB")
    # Only settings choose the model: the defaults are the shipped `lite` weights.
    settings = Settings(data_dir=tmp_path)
    with LiveServer(settings) as srv, srv.client(timeout=600) as c:
        r = c.post("/images", content=png_bytes(original), params={"wait": "true"})
        assert r.status_code == 201, r.text
        manifest = r.json()
        assert manifest["model"] == "lite"
        iid = manifest["id"]
        codec = Codec.load("lite")
        url = f"/images/{iid}/bitstream"
        for k, layer in enumerate(manifest["layers"]):
            prefix = c.get(url, headers={"Range": layer["prefix_range"]})
            assert prefix.status_code == 206
            out = codec.decode(prefix.content)
            assert out.layer == k and out.image.size == (layer["width"], layer["height"])
        full = c.get(f"/images/{iid}", params={"format": "png"})
        assert psnr(Image.open(io.BytesIO(full.content)).convert("RGB"), original) > 22
        top = manifest["layers"][-1]["width"]
        for width in (manifest["layers"][0]["width"] - 1, top // 2 + 1, top + 100):
            r = c.get(f"/images/{iid}", params={"width": width, "format": "png"})
            assert r.status_code == 200
            img = Image.open(io.BytesIO(r.content))
            assert img.size == fit_width(original.width, original.height, width)
