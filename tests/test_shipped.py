"""The shipped weights, really exercised: a Kodak image through every layer at both ends of the
quality range."""

from __future__ import annotations

import numpy as np
import pytest

from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec
from compass_serve.codec.registry import list_models, sha256_file
from compass_serve.evaluation.run import psnr
from compass_serve.imageio import load_rgb, resize
from tests.conftest import KODAK


@pytest.fixture(scope="module")
def lite() -> Codec:
    return Codec.load("lite")


def test_manifest_matches_weights() -> None:
    models = {m.name: m for m in list_models()}
    assert "lite" in models
    info = models["lite"]
    for path, sha256 in info.files:  # the decoder file and (since session 14) the encoder's
        assert sha256_file(path) == sha256
        assert path.stat().st_size < 16 * 1024 * 1024
    assert info.manifest["training"]["total_hours"] > 0


@pytest.mark.slow
def test_kodak_image_all_layers_and_qualities(lite: Codec) -> None:
    img = load_rgb(KODAK / "kodim23.png")
    sizes = [(192, 128), (384, 256), (768, 512)]
    refs = [resize(img, w, h) for w, h in sizes]
    rates, tops = [], []
    for q in (1.0, float(lite.qualities)):
        data = lite.encode(img, quality=q)
        table = bs.parse_header(data).table
        assert [(e.width, e.height) for e in table] == sizes
        layer_psnr = []
        for k in range(3):
            out = lite.decode(data[: table.prefix_length(k)])
            assert out.layer == k and out.image.size == sizes[k]
            layer_psnr.append(psnr(out.image, refs[k]))
        # A real codec, not noise: every layer resembles its target.
        assert min(layer_psnr) > 22.0, layer_psnr
        rates.append(len(data))
        tops.append(layer_psnr[-1])
        # Any width between layers: exact size, close to the top layer's quality.
        mid = lite.decode(data, width=500).image
        assert mid.size == (500, 333)
        assert np.asarray(mid).std() > 10
    # Higher quality costs more bytes and gives a better picture.
    assert rates[1] > rates[0] * 1.5
    assert tops[1] > tops[0] + 1.0


@pytest.mark.slow
def test_the_shipped_post_filter_raises_psnr_where_it_was_trained_to(lite: Codec) -> None:
    """The shipped filter (session 30) on a Kodak image it never saw: the top layer it shows beats
    the unfiltered reconstruction at a low and a middle quality, and the stream is the same."""
    enh = lite.model.enhancement
    assert enh.post_filter is not None
    img = load_rgb(KODAK / "kodim23.png")
    ref = resize(img, 768, 512)
    for q in (2.0, 5.0):
        data = lite.encode(img, quality=q)
        shown = psnr(lite.decode(data).image, ref)
        pf, enh.post_filter = enh.post_filter, None
        try:
            plain = psnr(lite.decode(data).image, ref)
            assert lite.encode(img, quality=q) == data  # the encoder never runs the filter
        finally:
            enh.post_filter = pf
        assert shown > plain + 0.02, (q, shown, plain)
