"""The post-filter: the identity until trained, the same function tiled, quality-aware, and shown
only: the chain of layers (each next layer's prediction) reads the unfiltered reconstruction."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compass_serve.codec.model import Compass, CompassConfig
from compass_serve.codec.postfilter import PostFilter, PostFilterConfig, deepen
from compass_serve.codec.registry import PRESETS
from compass_serve.training.train import TrainArgs, Trainer
from tests.conftest import photo


def trained_filter(channels: int = 6, layers: int = 3, qualities: int = 4) -> PostFilter:
    torch.manual_seed(0)
    pf = PostFilter(PostFilterConfig(channels, layers), qualities)
    with torch.no_grad():
        for p in pf.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return pf.eval()


def test_a_fresh_filter_is_the_identity() -> None:
    pf = PostFilter(PostFilterConfig(8, 3), qualities=4)
    x, pred = torch.rand(2, 3, 20, 30), torch.rand(2, 3, 20, 30)
    assert torch.equal(pf(x, pred, torch.tensor([0, 3])), x)
    with pytest.raises(ValueError, match="channels > 0"):
        PostFilter(PostFilterConfig(0, 3), qualities=4)


def test_tiles_compute_the_same_function() -> None:
    pf = trained_filter()
    x, pred = torch.rand(1, 3, 45, 70), torch.rand(1, 3, 45, 70)
    whole = pf(x, pred, 2.5)
    assert not torch.allclose(whole, x)
    for tile in (16, 23, 64):
        assert torch.allclose(pf.tiled(x, pred, 2.5, tile), whole, atol=1e-5), tile


def test_the_quality_plane_matches_trained_levels_and_moves_the_output() -> None:
    pf = trained_filter(qualities=8)
    x, pred = torch.rand(1, 3, 12, 12), torch.rand(1, 3, 12, 12)
    for level in range(8):  # training's 0-based level == decoding's quality level + 1
        assert torch.allclose(pf(x, pred, torch.tensor([level])), pf(x, pred, float(level + 1)))
    assert not torch.allclose(pf(x, pred, 1.0), pf(x, pred, 8.0))


def test_a_deepened_filter_computes_the_same_function_and_can_learn() -> None:
    shallow = trained_filter(channels=6, layers=3)
    deep = PostFilter(PostFilterConfig(6, 5), qualities=4)
    deepen(shallow, deep)
    assert deep.halo == 5
    x, pred = torch.rand(2, 3, 20, 30), torch.rand(2, 3, 20, 30)
    q = torch.tensor([0, 3])
    assert not torch.allclose(shallow(x, pred, q), x)
    assert torch.allclose(deep(x, pred, q), shallow(x, pred, q), atol=1e-6)
    # The added layers carry gradient: the identity is a starting point, not a dead end.
    (deep(x, pred, q) - x).square().mean().backward()
    assert deep.net[4].weight.grad is not None and deep.net[4].weight.grad.any()
    for wrong in (PostFilterConfig(8, 5), PostFilterConfig(6, 2)):
        with pytest.raises(ValueError, match="same width"):
            deepen(shallow, PostFilter(wrong, qualities=4))


def test_decode_shows_filtered_layers_while_the_chain_reads_unfiltered_ones() -> None:
    cfg = PRESETS["tiny"]
    torch.manual_seed(1)
    filtered = Compass(cfg).eval()
    pf = trained_filter(cfg.post_filter.channels, cfg.post_filter.layers, len(cfg.lambdas))
    filtered.enhancement.post_filter = pf
    plain = Compass(replace(cfg, post_filter=PostFilterConfig())).eval()
    plain.load_state_dict(filtered.state_dict(), strict=False)  # everything but the filter
    assert plain.enhancement.post_filter is None
    filtered.update()
    plain.update()
    images = [torch.rand(1, 3, 16, 24), torch.rand(1, 3, 32, 48), torch.rand(1, 3, 64, 96)]
    sizes = [(t.shape[-2], t.shape[-1]) for t in images]
    strings = plain.compress(images, 2.0)
    assert filtered.compress(images, 2.0) == strings  # the encoder never runs the filter
    shown, chain = filtered.decompress(strings, sizes, 2.0), plain.decompress(strings, sizes, 2.0)
    assert torch.equal(shown[0], chain[0])  # the base layer is shown as decoded
    for k in (1, 2):
        pred = filtered.enhancement.predict(chain[k - 1], sizes[k])
        assert torch.allclose(shown[k], pf(chain[k], pred, 2.0), atol=1e-5)
        assert not torch.allclose(shown[k], chain[k])
    # A decoder that displays one layer filters that layer alone: the chain never reads a
    # filtered layer, so the top comes out the same.
    calls: list[int] = []
    hook = pf.net.register_forward_hook(lambda *_: calls.append(1))
    (top,) = filtered.decompress(strings, sizes, 2.0, top_only=True)
    assert torch.equal(top, shown[2]) and len(calls) == 1
    (middle,) = filtered.decompress(strings[:2], sizes[:2], 2.0, top_only=True)
    assert torch.equal(middle, shown[1]) and len(calls) == 2
    hook.remove()


def test_configs_without_a_filter_load_as_before() -> None:
    cfg = PRESETS["lite"]
    d = cfg.to_dict()
    assert d["post_filter"] == {"channels": 0, "layers": 3, "in_loop": False}
    del d["post_filter"]  # a manifest written before the filter existed
    assert CompassConfig.from_dict(d) == cfg
    assert Compass(cfg).enhancement.post_filter is None
    pf = PRESETS["lite-wide-rc192-ga192-gs128-pf32"]
    assert CompassConfig.from_dict(pf.to_dict()) == pf
    del d  # a manifest written before `in_loop` existed reads as a filter outside the loop
    old = pf.to_dict()
    del old["post_filter"]["in_loop"]
    assert CompassConfig.from_dict(old) == pf and not pf.post_filter.in_loop
    il = PRESETS["lite-wide-rc192-ga192-gs128-pf32x5-il"]
    assert CompassConfig.from_dict(il.to_dict()) == il and il.post_filter.in_loop


def test_a_filter_in_the_loop_feeds_the_next_layer_on_both_sides() -> None:
    cfg = replace(PRESETS["tiny"], post_filter=replace(PRESETS["tiny"].post_filter, in_loop=True))
    torch.manual_seed(1)
    looped = Compass(cfg).eval()
    pf = trained_filter(cfg.post_filter.channels, cfg.post_filter.layers, len(cfg.lambdas))
    looped.enhancement.post_filter = pf
    shown_only = Compass(replace(cfg, post_filter=replace(cfg.post_filter, in_loop=False))).eval()
    shown_only.load_state_dict(looped.state_dict())
    looped.update()
    shown_only.update()
    images = [torch.rand(1, 3, 16, 24), torch.rand(1, 3, 32, 48), torch.rand(1, 3, 64, 96)]
    sizes = [(t.shape[-2], t.shape[-1]) for t in images]
    strings = looped.compress(images, 4.0)
    # The encoder runs the filter: the top layer is coded against another prediction (at the
    # top quality, where this random-weight residual codec codes more than zeros).
    other = shown_only.compress(images, 4.0)
    assert strings[:2] == other[:2] and strings[2] != other[2]
    shown = looped.decompress(strings, sizes, 4.0)
    # Layer 2 is predicted from layer 1 as shown, and shown through the filter itself.
    pred = looped.enhancement.predict(shown[1], sizes[2])
    x2 = pred + looped.enhancement.residual.decompress(strings[2], sizes[2], 4.0)
    assert torch.allclose(shown[2], pf(x2, pred, 4.0), atol=1e-5)
    # Decoding for display needs every filter on the way, and gives the same top layer.
    calls: list[int] = []
    hook = pf.net.register_forward_hook(lambda *_: calls.append(1))
    (top,) = looped.decompress(strings, sizes, 4.0, top_only=True)
    hook.remove()
    assert torch.equal(top, shown[2]) and len(calls) == 2


def test_training_through_a_filter_in_the_loop_reaches_the_filter() -> None:
    """In the loop, the top layer's own reconstruction depends on the layer-1 filter, so a joint
    loss on it trains the filter; outside the loop it cannot."""
    for in_loop in (True, False):
        cfg = replace(PRESETS["tiny"], post_filter=replace(PRESETS["tiny"].post_filter,
                                                           in_loop=in_loop))
        torch.manual_seed(2)
        model = Compass(cfg).train()
        assert model.enhancement.post_filter is not None
        with torch.no_grad():
            model.enhancement.post_filter.net[-1].weight.normal_(std=0.1)
        images = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32), torch.rand(2, 3, 64, 64)]
        outs = model(images, torch.tensor([0, 3]))
        x_hat = outs[-1]["x_hat"]
        assert isinstance(x_hat, torch.Tensor)
        (x_hat - images[-1]).square().mean().backward()
        grad = model.enhancement.post_filter.net[0].weight.grad
        assert (grad is not None and bool(grad.any())) == in_loop


def test_the_filter_stage_starts_from_weights_without_a_filter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train --stage filter --init-from` a run of a preset without a filter: the filter starts as
    the identity, every other weight as it was, and only the filter trains."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(21):
        photo(80, 72, seed=i).save(data / f"{i:02d}.png")
    monkeypatch.setitem(PRESETS, "tiny-plain", replace(PRESETS["tiny"],
                                                       post_filter=PostFilterConfig()))
    common = dict(data=str(data), minutes=0.03, lr=1e-3, batch=2, crop=64, threads=1,
                  warmup_steps=4, checkpoint_minutes=10, val_minutes=10)
    Trainer(TrainArgs(stage="joint", preset="tiny-plain", out=str(tmp_path / "a"),
                      **common)).run()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no post-filter"):
        Trainer(TrainArgs(stage="filter", preset="tiny-plain", out=str(tmp_path / "x"),
                          **common))  # type: ignore[arg-type]
    t = Trainer(TrainArgs(stage="filter", preset="tiny", out=str(tmp_path / "b"),
                          init_from=str(tmp_path / "a" / "last.safetensors"),
                          **common))  # type: ignore[arg-type]
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    last = t.model.enhancement.post_filter.net[-1]  # type: ignore[union-attr]
    assert not last.weight.any() and not last.bias.any()
    t.run()
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("enhancement.post_filter.") for n in changed)
    assert t.progress["filter"]["steps"] > 0 and t.progress["joint"]["steps"] > 0
    # Validation (model selection) measures the shown, filtered top layer.
    filtered = t.validate()
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    plain = t.validate()
    assert filtered["q1_bpp"] == plain["q1_bpp"] and filtered["q1_psnr"] != plain["q1_psnr"]
    # A deeper filter preset starts from this run as the same function (`deepen`).
    with torch.no_grad():
        last.weight.normal_(std=0.1)
    t.save()
    monkeypatch.setitem(PRESETS, "tiny-deep", replace(PRESETS["tiny"], post_filter=replace(
        PRESETS["tiny"].post_filter, layers=4)))
    d = Trainer(TrainArgs(stage="filter", preset="tiny-deep", out=str(tmp_path / "c"),
                          init_from=str(tmp_path / "b" / "last.safetensors"),
                          **common))  # type: ignore[arg-type]
    x, pred = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    shown = t.model.enhancement.post_filter(x, pred, 2.0)  # type: ignore[misc]
    assert not torch.allclose(shown, x)
    assert torch.allclose(d.model.enhancement.post_filter(x, pred, 2.0), shown,  # type: ignore[misc]
                          atol=1e-6)
    assert d.source_run is None  # deepened: Adam's moments no longer fit
    # The same filter put in the loop is loaded as it is, Adam's moments and all.
    monkeypatch.setitem(PRESETS, "tiny-il", replace(PRESETS["tiny"], post_filter=replace(
        PRESETS["tiny"].post_filter, in_loop=True)))
    il = Trainer(TrainArgs(stage="filter", preset="tiny-il", out=str(tmp_path / "e"),
                           init_from=str(tmp_path / "b" / "last.safetensors"),
                           **common))  # type: ignore[arg-type]
    assert il.source_run is not None
    assert torch.equal(il.model.enhancement.post_filter(x, pred, 2.0), shown)  # type: ignore[misc]
