"""Codec behaviour with tiny random-weight models: sizes, scale factors, prefixes, integrity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec, ModelMismatch, QualityError
from compass_serve.codec.ladder import LadderError, default_ladder, make_ladder
from compass_serve.codec.liff import Liff, LiffConfig
from tests.conftest import photo


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.parametrize("size", [(53, 37), (1, 1), (2, 3), (65, 17), (129, 131)])
def test_odd_and_tiny_sizes_round_trip(tiny_codec: Codec, size: tuple[int, int]) -> None:
    img = photo(*size)
    data = tiny_codec.encode(img, quality=2)
    out = tiny_codec.decode(data)
    assert out.image.size == size
    assert out.layer == len(bs.parse_header(data).table) - 1


@pytest.mark.parametrize("factor", [1.2, 1.6, 2.0, 2.4, 2.8, 4.0])
def test_two_layer_scale_factors(tiny_codec: Codec, factor: float) -> None:
    base = 31
    top = round(base * factor)
    img = photo(top, round(top * 0.7))
    data = tiny_codec.encode(img, widths=[base, top])
    table = bs.parse_header(data).table
    assert [e.width for e in table] == [base, top]
    for k, entry in enumerate(table):
        out = tiny_codec.decode(data[: table.prefix_length(k)], layer=k)
        assert out.image.size == (entry.width, entry.height)


@pytest.mark.parametrize("factor", [2.4, 2.8, 3.2, 3.6, 4.0])
def test_three_layer_chains(tiny_codec: Codec, factor: float) -> None:
    base = 24
    img = photo(round(base * factor), round(base * factor * 0.75))
    data = tiny_codec.encode(img, widths=[base, 2 * base, round(base * factor)])
    out = tiny_codec.decode(data)
    assert out.image.size == img.size and out.layer == 2


def test_every_layer_boundary_prefix_decodes_like_the_full_stream(tiny_codec: Codec) -> None:
    img = photo(96, 64)
    data = tiny_codec.encode(img, scales=[0.25, 0.5, 1.0])
    table = bs.parse_header(data).table
    for k in range(len(table)):
        prefix = data[: table.prefix_length(k)]
        from_prefix = tiny_codec.decode(prefix)
        from_full = tiny_codec.decode(data, layer=k)
        assert from_prefix.layer == k and not from_prefix.truncated
        assert np.array_equal(pixels(from_prefix.image), pixels(from_full.image))


def test_mid_layer_prefix_returns_highest_complete_layer(tiny_codec: Codec) -> None:
    data = tiny_codec.encode(photo(96, 64), scales=[0.25, 0.5, 1.0])
    table = bs.parse_header(data).table
    cut = table[2].offset + table[2].length // 2
    out = tiny_codec.decode(data[:cut])
    assert out.layer == 1 and out.truncated and out.complete_layers == 2
    assert "inside layer 2" in out.note
    with pytest.raises(bs.BitstreamError, match="no complete layer"):
        tiny_codec.decode(data[: table[0].offset + 1])
    with pytest.raises(bs.TruncatedHeader):
        tiny_codec.decode(data[:10])


def test_corrupted_layer_is_refused(tiny_codec: Codec) -> None:
    data = bytearray(tiny_codec.encode(photo(96, 64), scales=[0.5, 1.0]))
    table = bs.parse_header(bytes(data)).table
    data[table[1].offset + 3] ^= 0x40
    with pytest.raises(bs.CorruptLayer) as err:
        tiny_codec.decode(bytes(data))
    assert err.value.layer == 1
    # the intact prefix still decodes
    assert tiny_codec.decode(bytes(data[: table.prefix_length(0)])).layer == 0


def test_stream_from_other_weights_is_refused(tiny_store, tiny_codec: Codec) -> None:
    other = Codec.load("tiny-other", tiny_store)
    data = other.encode(photo(40, 30))
    with pytest.raises(ModelMismatch, match="tiny-other"):
        tiny_codec.decode(data)


def test_decode_to_any_width(tiny_codec: Codec) -> None:
    img = photo(120, 80)
    data = tiny_codec.encode(img, widths=[30, 60, 120])
    for width, layer in [(1, 0), (30, 0), (31, 1), (59, 1), (60, 1), (100, 2), (120, 2)]:
        out = tiny_codec.decode(data, width=width)
        assert out.image.width == width and out.layer == layer
        assert out.image.height == max(1, round(80 * width / 120))
    # Above the top layer, LIFF predicts from the top layer.
    out = tiny_codec.decode(data, width=301)
    assert out.image.size == (301, 201) and out.layer == 2
    # A prefix with only the base layer still gives the requested width.
    table = bs.parse_header(data).table
    out = tiny_codec.decode(data[: table.prefix_length(0)], width=100)
    assert out.image.size == (100, 67) and out.layer == 0


def test_quality_is_validated_and_changes_rate(tiny_codec: Codec) -> None:
    img = photo(64, 64)
    with pytest.raises(QualityError):
        tiny_codec.encode(img, quality=0.5)
    with pytest.raises(QualityError):
        tiny_codec.encode(img, quality=float("nan"))
    data = tiny_codec.encode(img, quality=1.37)
    assert bs.parse_header(data).quality == pytest.approx(1.37)
    assert tiny_codec.decode(data).image.size == (64, 64)


def test_ladders() -> None:
    assert default_ladder(768, 512) == [(192, 128), (384, 256), (768, 512)]
    assert default_ladder(200, 100) == [(200, 100)]
    assert default_ladder(4000, 3000) == [(250, 188), (500, 375), (1000, 750), (2000, 1500),
                                          (4000, 3000)]
    assert make_ladder(768, 512, scales=[0.25, 0.5, 1]) == [(192, 128), (384, 256), (768, 512)]
    assert make_ladder(768, 512, widths=[100, 768]) == [(100, 67), (768, 512)]
    for kwargs in [{"widths": [384, 192]}, {"widths": [800]}, {"scales": [0.5, 1.5]},
                   {"scales": [0.5, 0.5]}, {"widths": []}, {"widths": [1], "scales": [1]}]:
        with pytest.raises(LadderError):
            make_ladder(768, 512, **kwargs)


@pytest.mark.parametrize("size", [(37, 53), (64, 96), (1, 1), (17, 200)])
def test_latent_sizes_are_what_the_transforms_produce(size: tuple[int, int]) -> None:
    """The sizes the coder computes from the image alone (for the entropy coder and the
    synthesis) must be those the transforms produce, at any size."""
    from compass_serve.codec.backbone import BackboneConfig, HyperpriorBackbone

    torch.manual_seed(0)
    model = HyperpriorBackbone(BackboneConfig(n=8, m=12, qualities=2)).eval()
    assert model.g_a.stride == model.g_s.stride == 2 ** model.HALVINGS
    with torch.no_grad():
        y = model.g_a(torch.rand(1, 3, *size))
        z = model.h_a(y)
        assert tuple(y.shape[-2:]) == model.latent_sizes(size)[-1]
        assert tuple(z.shape[-2:]) == model.hyper_sizes(size)[-1]
        assert tuple(model.synthesize(y, size).shape[-2:]) == size


@pytest.mark.parametrize("size", [(211, 149), (64, 96), (97, 33)])
@pytest.mark.parametrize("tile", [16, 40, 64])
@pytest.mark.parametrize("kind", ["analysis", "synthesis"])
def test_transform_in_tiles_is_the_same_function(kind: str, size: tuple[int, int], tile: int) -> None:
    from compressai.layers import GDN

    from compass_serve.codec.layers import Analysis, Synthesis, halvings

    torch.manual_seed(0)
    if kind == "analysis":
        net: Analysis | Synthesis = Analysis([3, 8, 8, 8, 12], GDN).double().eval()
        # 4 stages of 5x5: two latent cells of the whole image's stride 16
        halo, out_shape = 32, None
        x = torch.rand(2, 3, *size, dtype=torch.float64)
        whole_fn, tiled_fn = lambda: net(x), lambda: net.tiled(x, tile)
    else:
        net = Synthesis([12, 8, 8, 8, 3], GDN).double().eval()
        halo, out_shape = 2, (2, 3, *size)  # 30 pixels spoilt next to a cut: two latent cells
        sizes = halvings(*size, 4)[::-1]
        y = torch.randn(2, 12, *sizes[0], dtype=torch.float64)
        whole_fn, tiled_fn = lambda: net(y, sizes[1:]), lambda: net.tiled(y, sizes[1:], tile)
    assert net.halo() == halo
    with torch.no_grad():
        whole = whole_fn()
        tiled = tiled_fn()
        assert tiled.shape == whole.shape
        assert out_shape is None or tuple(whole.shape) == out_shape
        assert torch.allclose(tiled, whole, rtol=0, atol=1e-12)
        # The halo is what makes it exact: tiles cut without one see zeros at every cut.
        net.halo = lambda: 0  # type: ignore[method-assign]
        if max(size) > max(tile, 16):
            assert not torch.allclose(tiled_fn(), whole, rtol=0, atol=1e-6)


def test_coding_in_transform_tiles_gives_the_same_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from compass_serve.codec import backbone
    from compass_serve.codec.layers import Analysis, Synthesis
    from compass_serve.codec.registry import PRESETS, build

    torch.manual_seed(0)
    model = build(PRESETS["tiny"]).eval()
    with torch.no_grad():  # random weights code almost nothing: raise the gains so that they do
        model.base.codec.log_gain += 3
        model.enhancement.residual.log_gain += 3
    model.update()
    codec = Codec(model, "tiny", bytes(8))
    img = photo(150, 110)

    def coded() -> tuple[int, np.ndarray]:
        data = codec.encode(img, quality=2)
        return len(data), pixels(codec.decode(data).image)

    n_whole, whole = coded()
    monkeypatch.setattr(backbone, "TRANSFORM_TILE", 32)  # the top layers of this ladder are cut
    n_tiled, tiled = coded()
    # Float32 sums in another order may flip a rounding here and there: the same stream up to that.
    assert abs(n_tiled - n_whole) <= 0.01 * n_whole
    assert np.abs(tiled - whole).mean() < 0.1
    monkeypatch.setattr(Analysis, "halo", lambda self: 0)  # encoder cuts without neighbours
    n_cut, cut = coded()
    assert abs(n_cut - n_whole) > 0.05 * n_whole and np.abs(cut - whole).mean() > 1
    monkeypatch.undo()
    monkeypatch.setattr(backbone, "TRANSFORM_TILE", 32)
    monkeypatch.setattr(Synthesis, "halo", lambda self: 0)  # decoder cuts without neighbours
    assert np.abs(coded()[1] - whole).mean() > 1


def test_liff_chunked_inference_equals_whole_image() -> None:
    torch.manual_seed(0)
    liff = Liff(LiffConfig(features=8, blocks=1, convs=2, growth=8, hidden=16, depth=2,
                           chunk_pixels=97))
    x = torch.rand(1, 3, 13, 17)
    liff.train()
    whole = liff(x, (40, 47))
    liff.eval()
    chunked = liff(x, (40, 47))
    assert chunked.shape == (1, 3, 40, 47)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_liff_in_place_inference_equals_the_autograd_path() -> None:
    """Inference overwrites per-pixel temporaries in place; it must compute exactly what the
    out-of-place (autograd) path computes, or decodes would drift from training."""
    torch.manual_seed(1)
    liff = Liff(LiffConfig(features=8, blocks=1, convs=2, growth=8, hidden=16, depth=3)).eval()
    x = torch.rand(2, 3, 11, 9)
    with torch.enable_grad():
        graded = liff(x, (31, 20))
    with torch.inference_mode():
        in_place = liff(x, (31, 20))
    assert graded.requires_grad and not in_place.requires_grad
    assert torch.equal(graded.detach(), in_place)


def test_liff_strips_equal_whole_image_at_every_scale() -> None:
    """Strip-wise inference (bounded memory) computes the same function as one pass."""
    torch.manual_seed(1)
    cfg = LiffConfig(features=8, blocks=1, convs=2, growth=8, hidden=16, depth=2, chunk_pixels=64)
    liff = Liff(cfg)
    x = torch.rand(1, 3, 70, 9)
    for size in [(84, 11), (140, 18), (280, 36), (71, 9)]:
        liff.train()
        whole = liff(x, size)
        liff.eval()
        strips = liff(x, size)
        assert torch.allclose(whole, strips, atol=1e-5), size


def test_liff_with_bicubic_skip_starts_as_bicubic_and_strips_match() -> None:
    torch.manual_seed(2)
    cfg = LiffConfig(features=8, blocks=1, convs=2, growth=8, hidden=16, depth=2, chunk_pixels=64,
                     skip="bicubic")
    liff = Liff(cfg).eval()
    x = torch.rand(1, 3, 30, 20)
    bicubic = torch.nn.functional.interpolate(x, size=(75, 50), mode="bicubic", align_corners=False)
    assert torch.allclose(liff(x, (75, 50)), bicubic, atol=1e-6)
    torch.nn.init.normal_(liff.filter.weight, std=0.05)
    liff.train()
    whole = liff(x, (75, 50))
    liff.eval()
    assert torch.allclose(whole, liff(x, (75, 50)), atol=1e-5)
    assert not torch.allclose(whole, bicubic, atol=1e-3)


def test_cdf_tables_are_reproducible() -> None:
    """update() gives the same CDF tables for the same weights at any thread count or memory
    layout (a stream needs the exact tables its encoder used)."""
    from compass_serve.codec.backbone import BackboneConfig, build_backbone
    from compass_serve.codec.registry import load_state

    torch.manual_seed(7)
    codec = build_backbone(BackboneConfig(n=16, m=24))
    with torch.no_grad():  # a trained-looking density: spread quantiles, non-trivial matrices
        for name, p in codec.entropy_bottleneck.named_parameters():
            p.add_(torch.randn_like(p) * (3.0 if name == "quantiles" else 0.3))
    tables = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 1):
            torch.set_num_threads(n_threads)
            twin = build_backbone(BackboneConfig(n=16, m=24))  # fresh buffers elsewhere in memory
            load_state(twin, codec.state_dict())
            for model in (codec, twin):
                model.update()
                eb = model.entropy_bottleneck
                tables.append((eb._quantized_cdf.clone(), eb._offset.clone(), eb._cdf_length.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert tables[0][0].numel() > 0
    for cdf, offset, length in tables[1:]:
        assert torch.equal(cdf, tables[0][0])
        assert torch.equal(offset, tables[0][1])
        assert torch.equal(length, tables[0][2])


def test_regridding_gains_keeps_shared_levels_and_extends_the_ladder_linearly() -> None:
    from compass_serve.codec.backbone import regrid_gains
    from compass_serve.codec.model import DEFAULT_LAMBDAS, WIDE_LAMBDAS

    old = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    state = {"base.codec.log_gain": old, "enhancement.residual.log_inv_gain": -old,
             "base.codec.g_a.0.weight": torch.ones(2)}
    new = regrid_gains(state, DEFAULT_LAMBDAS, WIDE_LAMBDAS)
    gain = new["base.codec.log_gain"]
    assert gain.shape == (8, 6)
    assert torch.equal(gain[2:6], old)  # the four trained levels, bit for bit
    assert torch.equal(new["enhancement.residual.log_inv_gain"][2:6], -old)
    assert new["base.codec.g_a.0.weight"] is state["base.codec.g_a.0.weight"]
    # Beyond the ends: the nearest segment's line in log-lambda, continued.
    step = lambda i, j: np.log(WIDE_LAMBDAS[i] / WIDE_LAMBDAS[j])  # noqa: E731
    lo = old[0] + (old[1] - old[0]) * step(1, 2) / step(3, 2)
    assert torch.allclose(gain[1], lo, atol=1e-6)
    hi = old[3] + (old[3] - old[2]) * step(7, 5) / step(5, 4)
    assert torch.allclose(gain[7], hi, atol=1e-6)
    # Between trained levels: interpolation (geometric in lambda, as fractional qualities are).
    mid = regrid_gains(state, DEFAULT_LAMBDAS, (np.sqrt(0.0018 * 0.0035),))["base.codec.log_gain"]
    assert torch.allclose(mid[0], (old[0] + old[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="rise"):
        regrid_gains(state, (0.01, 0.001), WIDE_LAMBDAS)


def test_rate_ladder_config_and_default_quality() -> None:
    from compass_serve.codec.backbone import BackboneConfig
    from compass_serve.codec.model import WIDE_LAMBDAS, Compass, CompassConfig
    from compass_serve.codec.registry import PRESETS

    with pytest.raises(ValueError, match="8 lambdas but gain tables for 4"):
        CompassConfig(base=BackboneConfig(n=16, m=24), residual=BackboneConfig(n=16, m=24),
                      lambdas=WIDE_LAMBDAS)
    wide = PRESETS["tiny"].with_lambdas(WIDE_LAMBDAS)
    assert wide.base.qualities == wide.residual.qualities == 8
    # The default quality is the level coding lambda 0.0067 on either ladder.
    assert Compass(PRESETS["tiny"]).default_quality == 3.0
    assert Compass(wide).default_quality == 5.0
    assert PRESETS["lite-wide"].lambdas[4] == PRESETS["lite"].lambdas[2] == 0.0067


def test_a_widened_model_codes_its_old_rate_points_exactly_as_before(tiny_codec: Codec) -> None:
    from compass_serve.codec.backbone import regrid_gains
    from compass_serve.codec.model import WIDE_LAMBDAS
    from compass_serve.codec.registry import build

    model = tiny_codec.model
    wide_cfg = model.cfg.with_lambdas(WIDE_LAMBDAS)
    wide = Codec(build(wide_cfg, regrid_gains(model.state_dict(), model.cfg.lambdas,
                                              WIDE_LAMBDAS)), "tiny", tiny_codec.weights_id)
    img = photo(96, 64, seed=3)
    for q in (1.0, 2.5, 4.0):  # old quality q is level q + 2 of the wide ladder
        old = bs.Bitstream.parse(tiny_codec.encode(img, quality=q)).payloads
        new = bs.Bitstream.parse(wide.encode(img, quality=q + 2)).payloads
        assert [bytes(p) for p in old] == [bytes(p) for p in new]
    assert wide.decode(wide.encode(img, quality=8.0)).image.size == (96, 64)  # new levels code


def test_widening_the_transforms_keeps_the_codes_and_lets_the_new_units_learn() -> None:
    from compass_serve.codec.backbone import BackboneConfig, HyperpriorBackbone, widen

    torch.manual_seed(0)
    old = HyperpriorBackbone(BackboneConfig(n=16, m=24))
    with torch.no_grad():  # trained-like gains: hundreds of bytes of latent, not a few zeros
        old.log_gain += 4
        old.log_inv_gain -= 4
    old.eval()
    old.update()
    new = HyperpriorBackbone(BackboneConfig(n=16, m=24, n_analysis=32, n_synthesis=24))
    widen(old, new)
    new.eval()
    assert new.g_a.stages[1].conv.weight.shape == (32, 32, 5, 5)
    assert new.g_s.stages[1].conv.weight.shape == (24, 24, 5, 5)
    x = torch.rand(1, 3, 48, 64) - 0.5
    for q in (1.0, 2.5, 4.0):
        a, b = old.compress(x, q), new.compress(x, q)
        assert len(a.strings[1]) > 100
        assert a.strings == b.strings
        assert torch.allclose(a.x_hat, b.x_hat, atol=1e-5)
        assert torch.allclose(new.decompress(b.strings, (48, 64), q), a.x_hat, atol=1e-5)
    # The new units' outgoing weights start at zero, but their gradient does not.
    new.train()
    out = new(x, torch.tensor([3]))
    ((out["x_hat"] - x) ** 2).mean().backward()
    for stages, width in ((new.g_a.stages, 16), (new.g_s.stages, 16)):
        for stage in stages[1:]:
            grad = stage.conv.weight.grad
            new_inputs = grad[:, width:] if isinstance(stage.conv, torch.nn.Conv2d) else grad[width:]
            assert grad is not None and new_inputs.abs().sum() > 0
    with pytest.raises(ValueError, match="widen"):
        widen(new, old)
    with pytest.raises(ValueError, match="widen"):
        widen(old, HyperpriorBackbone(BackboneConfig(n=32, m=24, n_analysis=64)))


def test_widening_the_latent_keeps_the_codes_and_lets_the_extra_channels_learn() -> None:
    from compass_serve.codec.backbone import BackboneConfig, HyperpriorBackbone, widen_latent

    torch.manual_seed(0)
    old = HyperpriorBackbone(BackboneConfig(n=16, m=24)).eval()
    old.update()
    new = HyperpriorBackbone(BackboneConfig(n=16, m=40))
    widen_latent(old, new)
    new.eval()
    x = torch.rand(1, 3, 48, 64) - 0.5  # a residual: signed
    for q in (1.0, 2.5, 4.0):
        a, b = old.compress(x, q), new.compress(x, q)
        assert torch.equal(a.x_hat, b.x_hat)
        assert a.strings[0] == b.strings[0]  # the hyper-latent: the same symbols
        assert len(b.strings[1]) <= len(a.strings[1]) + 2  # zeros in the new channels: ~0 bits
        decoded = new.decompress(b.strings, (48, 64), q)
        assert torch.allclose(decoded, a.x_hat, atol=1e-5)
    # The distortion's gradient reaches the new channels' analysis rows (the rate alone would
    # only ever push them back to zero).
    new.train()
    out = new(x, torch.tensor([3]))
    ((out["x_hat"] - x) ** 2).mean().backward()
    grad = new.g_a.stages[-1].conv.weight.grad
    assert grad is not None and grad[24:].abs().sum() > 0
    with pytest.raises(ValueError, match="widen"):
        widen_latent(new, old)
    with pytest.raises(ValueError, match="widen"):
        widen_latent(old, HyperpriorBackbone(BackboneConfig(n=32, m=40)))
