"""The checkerboard context model: exact two-pass coding, "no effect" at initialisation, and
extending trained weights with it (loading and training)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from compass_serve.codec.backbone import BackboneConfig, HyperpriorBackbone, build_backbone
from compass_serve.codec.context import anchor_mask
from compass_serve.codec.registry import PRESETS, load_state, state_dict_for_save
from compass_serve.imageio import to_tensor
from compass_serve.training.train import NEW_MODULES, TrainArgs, Trainer
from tests.conftest import photo

PLAIN = BackboneConfig(n=16, m=24)
CTX = dataclasses.replace(PLAIN, context="checkerboard", context_hidden=16)


def image(h: int = 45, w: int = 67, seed: int = 0) -> torch.Tensor:
    return to_tensor(photo(w, h, seed=seed))


def with_context(seed: int = 0) -> HyperpriorBackbone:
    torch.manual_seed(seed)
    b = build_backbone(CTX)
    assert isinstance(b, HyperpriorBackbone) and b.context is not None
    for p in b.context.parameters():  # an active context (it starts at "no effect")
        torch.nn.init.normal_(p, std=0.2)
    b.update()
    return b.eval()


def test_anchors_are_a_checkerboard() -> None:
    m = anchor_mask(3, 4)
    assert m.tolist() == [[True, False, True, False], [False, True, False, True],
                          [True, False, True, False]]


@pytest.mark.parametrize("size", [(45, 67), (64, 64), (17, 30)])
def test_two_pass_coding_round_trips_exactly(size: tuple[int, int]) -> None:
    b = with_context()
    x = image(*size)
    coded = b.compress(x, 2.5)
    assert len(coded.strings) == 3 and all(coded.strings[1:])
    assert torch.equal(b.decompress(coded.strings, size, 2.5), coded.x_hat)
    with pytest.raises(ValueError, match="3 entropy-coded strings"):
        b.decompress(coded.strings[:2], size, 2.5)


def test_decoding_does_not_depend_on_the_thread_count() -> None:
    b = with_context(1)
    x = image(64, 96, seed=3)
    coded = b.compress(x, 3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = b.decompress(coded.strings, (64, 96), 3.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, coded.x_hat)


def test_the_context_changes_the_second_half_only() -> None:
    """The anchors' string is the hyperprior's alone; the context moves the second half's."""
    active = with_context()
    quiet = build_backbone(CTX)
    load_state(quiet, {k: v for k, v in active.state_dict().items() if ".context." not in f".{k}"},
               new_modules=NEW_MODULES)
    quiet.update()
    quiet.eval()
    x = image()
    a, q = active.compress(x, 2.0), quiet.compress(x, 2.0)
    assert a.strings[:2] == q.strings[:2] and a.strings[2] != q.strings[2]


def test_a_new_context_starts_as_the_model_without_it() -> None:
    torch.manual_seed(0)
    plain = build_backbone(PLAIN)
    ctx = build_backbone(CTX)
    load_state(ctx, plain.state_dict(), new_modules=NEW_MODULES)
    for b in (plain, ctx):
        b.update()
        b.eval()
    x = image()
    cp, cc = plain.compress(x, 3.0), ctx.compress(x, 3.0)
    assert torch.equal(cp.x_hat, cc.x_hat)
    # Same symbols and probabilities, split in two range-coder streams: a few bytes of overhead.
    assert 0 <= sum(map(len, cc.strings)) - sum(map(len, cp.strings)) <= 8
    q = torch.tensor([1])
    lp, lc = plain(x, q)["likelihoods"], ctx(x, q)["likelihoods"]
    assert all(torch.equal(lp[k], lc[k]) for k in lp)


def test_estimated_and_coded_rates_agree() -> None:
    """The training-time rate (context included) is what the coder spends."""
    b = with_context(2)
    x = image(96, 128, seed=5)
    with torch.no_grad():
        lik = b(x, torch.tensor([2]))["likelihoods"]
    estimate = sum(float(-torch.log2(v).sum()) for v in lik.values()) / 8
    coded = sum(map(len, b.compress(x, 3.0).strings))
    assert math.isclose(coded, estimate, rel_tol=0.1, abs_tol=16)


def test_missing_weights_other_than_new_parts_are_refused() -> None:
    plain = build_backbone(PLAIN).state_dict()
    with pytest.raises(RuntimeError, match="missing"):
        load_state(build_backbone(CTX), plain)  # the context is not declared new here
    partial = {k: v for k, v in plain.items() if not k.startswith("h_s.")}
    with pytest.raises(RuntimeError, match="h_s"):
        load_state(build_backbone(CTX), partial, new_modules=NEW_MODULES)


def test_training_extends_a_run_with_a_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = PRESETS["tiny"]
    monkeypatch.setitem(PRESETS, "tiny-ctx", dataclasses.replace(
        tiny, residual=dataclasses.replace(tiny.residual, context="checkerboard", context_hidden=8)))
    data = tmp_path / "data"
    data.mkdir()
    for i in range(21):
        photo(80, 72, seed=i).save(data / f"{i:02d}.png")
    common = dict(data=str(data), minutes=0.03, lr=1e-3, batch=2, crop=64, threads=1,
                  warmup_steps=4, checkpoint_minutes=10, val_minutes=10)
    Trainer(TrainArgs(stage="joint", preset="tiny", out=str(tmp_path / "a"), **common)).run()
    t = Trainer(TrainArgs(stage="joint", preset="tiny-ctx", out=str(tmp_path / "b"),
                          init_from=str(tmp_path / "a" / "last.safetensors"), new_lr_scale=3.0,
                          **common | {"minutes": 0.08}))  # the budget counts the stage's record
    src = state_dict_for_save(t.model)
    first = Trainer(TrainArgs(stage="joint", preset="tiny", out=str(tmp_path / "a"), **common))
    for k, v in state_dict_for_save(first.model).items():
        assert torch.equal(src[k], v), k  # every trained weight carried over
    assert t.progress["joint"]["steps"] == first.progress["joint"]["steps"]  # the record too
    groups = t.opt.param_groups
    assert [g["lr_scale"] for g in groups] == [1.0, 3.0]
    # Adam carries on for the trained parameters (no restart from zero) and starts the new ones.
    saved = torch.load(tmp_path / "a" / "optimizer-joint.pt", weights_only=True)["opt"]
    assert t.start_lr == pytest.approx(saved["param_groups"][0]["lr"]) and t.start_lr > 0
    for i, p in enumerate(groups[0]["params"]):
        assert torch.equal(t.opt.state[p]["exp_avg"], saved["state"][i]["exp_avg"])
    assert all(p not in t.opt.state for p in groups[1]["params"])
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for p in t.model.enhancement.residual.context.parameters()}
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if ".context." in n}
    assert not any(p.abs().sum() for n, p in before.items() if ".out." in n)  # "no effect"
    t.run()
    moved = [n for n, p in t.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(".out." in n for n in moved)
