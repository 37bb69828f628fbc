"""The staged trainer on a tiny model: each stage moves only its own parameters, runs resume
where they stopped, and a resume that raises the learning rate ramps up to it."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compass_serve.codec.registry import state_dict_for_save
from compass_serve.training.train import STAGES, TrainArgs, Trainer
from tests.conftest import photo

# Which parameters each stage may change (prefixes of Compass's parameter names).
TRAINS = {
    "backbone": ("base.",),
    "liff": ("enhancement.liff.",),
    "residual": ("enhancement.residual.",),
    "joint": ("enhancement.liff.", "enhancement.residual."),
    "filter": ("enhancement.post_filter.",),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    for i in range(21):  # every 20th image (index 10) is held out
        photo(80, 72, seed=i).save(root / f"{i:02d}.png")
    return root


def args(data: Path, out: Path, stage: str, **kw: object) -> TrainArgs:
    base = dict(stage=stage, preset="tiny", data=str(data), out=str(out), minutes=0.03, lr=1e-3,
                batch=2, crop=64, threads=1, warmup_steps=4, checkpoint_minutes=10,
                val_minutes=10)
    base.update(kw)
    return TrainArgs(**base)  # type: ignore[arg-type]


def params(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in t.model.named_parameters()}


def test_each_stage_moves_only_its_own_parameters(data: Path, tmp_path: Path) -> None:
    for stage in STAGES:
        t = Trainer(args(data, tmp_path, stage))
        before = params(t)
        t.run()
        after = params(t)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed, f"{stage} trained nothing"
        strays = {n for n in changed if not n.startswith(TRAINS[stage])}
        assert not strays, f"{stage} changed frozen parameters: {sorted(strays)[:5]}"
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert all(progress[s]["steps"] > 0 for s in STAGES)
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [r["stage"] for r in rows] == list(STAGES)  # one validation row per stage's end
    assert all(float(r["val_loss"]) > 0 for r in rows)
    for name in ("last", "best"):
        assert (tmp_path / f"{name}.safetensors").stat().st_size > 0


def test_a_longer_budget_resumes_where_the_run_stopped(data: Path, tmp_path: Path) -> None:
    assert Trainer(args(data, tmp_path, "residual")).run() is True  # ran to its budget
    first = json.loads((tmp_path / "progress.json").read_text())["residual"]
    Trainer(args(data, tmp_path, "residual", minutes=0.06)).run()
    second = json.loads((tmp_path / "progress.json").read_text())["residual"]
    assert second["steps"] > first["steps"]
    assert second["seconds"] >= 0.06 * 60 > first["seconds"]
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert sum(line.startswith("stage,") for line in lines) == 1  # appended, header once
    assert len(lines) == 3


def test_a_budget_already_spent_trains_nothing_and_says_so(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Trainer(args(data, tmp_path, "residual", minutes=0.06)).run()
    before = json.loads((tmp_path / "progress.json").read_text())["residual"]
    with caplog.at_level("WARNING", logger="compass_serve.training.train"):
        assert Trainer(args(data, tmp_path, "residual", minutes=0.03)).run() is True
    after = json.loads((tmp_path / "progress.json").read_text())["residual"]
    assert after["steps"] == before["steps"]
    assert "nothing to train" in caplog.text and "--minutes 0.03" in caplog.text


def test_warm_up_ramps_from_zero_or_from_the_resumed_rate(data: Path, tmp_path: Path) -> None:
    fresh = Trainer(args(data, tmp_path, "residual", lr=1e-3, resume=False))
    assert fresh.start_lr == 0.0
    assert fresh.lr_at(0.0, 0) == pytest.approx(1e-3 / 4)
    fresh.run()
    # The run ended in its cosine decay; a new cycle at a higher rate ramps up from the saved
    # rate instead of jumping on warm Adam moments.
    last = float(list(csv.DictReader((tmp_path / "log.csv").open()))[-1]["lr"])
    assert last < 1e-3
    resumed = Trainer(args(data, tmp_path, "residual", minutes=1.0, lr=2e-3))
    assert resumed.start_lr == pytest.approx(last)
    ramp = [resumed.lr_at(0.0, s) for s in range(5)]
    assert ramp[0] == pytest.approx(last + (2e-3 - last) / 4)
    assert ramp == sorted(ramp) and ramp[-1] == pytest.approx(2e-3)
    # A resume at or below the saved rate needs no ramp.
    lower = Trainer(args(data, tmp_path, "residual", minutes=1.0, lr=0.01e-3))
    assert lower.lr_at(0.0, 0) == pytest.approx(0.01e-3)


def test_a_run_continues_from_another_runs_checkpoint(data: Path, tmp_path: Path) -> None:
    """--init-from CHECKPOINT: weights, training record and Adam moments carry over."""
    Trainer(args(data, tmp_path / "a", "joint")).run()
    source = Trainer(args(data, tmp_path / "a", "joint"))  # resumed: what run a holds now
    t = Trainer(args(data, tmp_path / "b", "joint", minutes=0.06,
                     init_from=str(tmp_path / "a" / "last.safetensors")))
    assert {k: v.tolist() for k, v in t.model.state_dict().items()} == {
        k: v.tolist() for k, v in source.model.state_dict().items()}
    assert t.progress["joint"] == source.progress["joint"]
    assert t.start_lr == source.start_lr > 0  # no warm-up from zero on fresh moments
    for p, q in zip(t.params, source.params, strict=True):
        assert torch.equal(t.opt.state[p]["exp_avg"], source.opt.state[q]["exp_avg"])
    t.run()  # the budget counts the carried record: it trains the difference only
    assert t.progress["joint"]["steps"] > source.progress["joint"]["steps"]
    assert (tmp_path / "b" / "best.safetensors").exists()
    # best's own record: the steps when it was saved, which the run's record can only pass.
    best = json.loads((tmp_path / "b" / "best.progress.json").read_text())
    assert source.progress["joint"]["steps"] < best["joint"]["steps"] <= t.progress["joint"]["steps"]


def test_init_from_a_checkpoint_on_another_rate_ladder_regrids_the_gains(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A four-level run continues on the eight-level ladder: old levels unchanged, new ones
    trained, the carried record kept, Adam fresh (its moments do not fit the new tables)."""
    from compass_serve.codec.model import WIDE_LAMBDAS
    from compass_serve.codec.registry import PRESETS

    monkeypatch.setitem(PRESETS, "tiny-wide", PRESETS["tiny"].with_lambdas(WIDE_LAMBDAS))
    Trainer(args(data, tmp_path / "a", "joint")).run()
    source = Trainer(args(data, tmp_path / "a", "joint"))
    t = Trainer(args(data, tmp_path / "b", "joint", preset="tiny-wide", minutes=0.06,
                     init_from=str(tmp_path / "a" / "last.safetensors")))
    old, new = source.model.state_dict(), t.model.state_dict()
    for key in old:
        if key.endswith(("log_gain", "log_inv_gain")):
            assert new[key].shape[0] == 8 and torch.equal(new[key][2:6], old[key]), key
        else:
            assert torch.equal(new[key], old[key]), key
    assert t.progress["joint"] == source.progress["joint"]
    assert t.start_lr == 0.0 and not t.opt.state
    before = params(t)
    t.run()
    after = params(t)
    gains = "enhancement.residual.log_gain"
    assert not torch.equal(before[gains], after[gains])
    rows = list(csv.DictReader((tmp_path / "b" / "log.csv").open()))
    assert rows and "q8_psnr" in rows[-1]
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["preset"] == "tiny-wide"


def test_export_records_the_validation_row_of_the_exported_weights(tmp_path: Path) -> None:
    """The log rounds losses to 4 places: of tied rows, the last one wrote best.safetensors."""
    from safetensors.torch import save_file

    from compass_serve.codec.registry import PRESETS, build, state_dict_for_save
    from compass_serve.training.export import export_run

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best", "last"):
        save_file(state_dict_for_save(build(PRESETS["tiny"])), str(run / f"{name}.safetensors"))
    (run / "progress.json").write_text(json.dumps(
        {"joint": {"steps": 30, "seconds": 60.0}, "preset": "tiny", "best_joint": 1.04595}))
    fields = ["stage", "step", "q1_psnr", "val_loss"]
    with (run / "log.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for step, psnr, loss in ((5, 26.0, "1.0470"), (10, 27.0, "1.0460"), (20, 28.0, "1.0460"),
                                 (30, 29.0, "1.0480")):
            w.writerow({"stage": "joint", "step": step, "q1_psnr": psnr, "val_loss": loss})
    info = export_run(run, "tiny", weights="best", store=tmp_path / "store")
    assert info.manifest["training"]["validation"]["q1_psnr"] == 28.0
    # Without the record saved beside best.safetensors, the run's latest is all there is.
    assert info.manifest["training"]["stages"]["joint"]["steps"] == 30
    last = export_run(run, "tiny", weights="last", store=tmp_path / "store").manifest["training"]
    assert last["validation"]["q1_psnr"] == 29.0
    # With it, the manifest's steps and hours are those of the exported weights, not the run's end.
    (run / "best.progress.json").write_text(json.dumps(
        {"joint": {"steps": 20, "seconds": 36.0}, "preset": "tiny", "best_joint": 1.04595}))
    stages = export_run(run, "tiny", weights="best", store=tmp_path / "store").manifest[
        "training"]["stages"]
    assert stages["joint"] == {"steps": 20, "hours": 0.01}
    # A tie in the rounded log is settled by the record's step, not guessed as the last row
    # (session 22: the best 1.21115 at one step, 1.21119 at the next, both logged as 1.2112).
    (run / "best.progress.json").write_text(json.dumps(
        {"joint": {"steps": 10, "seconds": 18.0}, "preset": "tiny", "best_joint": 1.04595}))
    info = export_run(run, "tiny", weights="best", store=tmp_path / "store")
    assert info.manifest["training"]["validation"]["q1_psnr"] == 27.0
    assert export_run(run, "tiny", weights="last", store=tmp_path / "store").manifest[
        "training"]["stages"]["joint"]["steps"] == 30


def test_export_log_reads_and_plots_a_log_outside_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export --log`: the committed log a run's rows were appended to, no staging copy."""
    from safetensors.torch import save_file

    from compass_serve.cli import main
    from compass_serve.codec.registry import PRESETS, build, state_dict_for_save

    run = tmp_path / "run"
    run.mkdir()
    save_file(state_dict_for_save(build(PRESETS["tiny"])), str(run / "best.safetensors"))
    for record in ("progress.json", "best.progress.json"):
        (run / record).write_text(json.dumps(
            {"joint": {"steps": 20, "seconds": 36.0}, "preset": "tiny", "best_joint": 1.046}))
    fields = ["stage", "step", "hours", "q1_psnr", "val_loss"]
    for path, psnr in ((run / "log.csv", 21.0), (tmp_path / "committed.csv", 28.0)):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerow({"stage": "joint", "step": 10, "hours": 0.005, "q1_psnr": psnr - 1,
                        "val_loss": "1.0500"})
            w.writerow({"stage": "joint", "step": 20, "hours": 0.01, "q1_psnr": psnr,
                        "val_loss": "1.0460"})
    store = tmp_path / "store"
    monkeypatch.setenv("COMPASS_MODEL_STORE", str(store))
    plot = tmp_path / "curve.png"
    assert main(["export", "--run", str(run), "--name", "tiny", "--weights", "best",
                 "--log", str(tmp_path / "committed.csv"), "--plot", str(plot)]) == 0
    manifest = json.loads((store / "tiny.json").read_text())
    assert manifest["training"]["validation"]["q1_psnr"] == 28.0
    assert plot.stat().st_size > 1000
    # Without --log the run's own log is read; a --log that does not exist is refused.
    assert main(["export", "--run", str(run), "--name", "tiny", "--weights", "best"]) == 0
    assert json.loads((store / "tiny.json").read_text())["training"]["validation"][
        "q1_psnr"] == 21.0
    assert main(["export", "--run", str(run), "--name", "tiny", "--weights", "best",
                 "--log", str(tmp_path / "missing.csv")]) == 2


def test_init_from_a_narrower_residual_latent_widens_it_and_trains_a_new_cycle(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--init-from a checkpoint of a preset with fewer residual latent channels and a narrower
    residual analysis transform: everything else carried over unchanged, the old channels in
    place, Adam fresh; --cycle-minutes starts the learning-rate schedule afresh at the carried
    hours."""
    from dataclasses import replace

    from compass_serve.codec.registry import PRESETS

    tiny = PRESETS["tiny"]
    monkeypatch.setitem(PRESETS, "tiny-rc", replace(
        tiny, residual=replace(tiny.residual, m=40, n_analysis=24)))
    Trainer(args(data, tmp_path / "a", "joint")).run()
    source = Trainer(args(data, tmp_path / "a", "joint"))
    t = Trainer(args(data, tmp_path / "b", "joint", preset="tiny-rc", minutes=0.09,
                     cycle_minutes=0.06, init_from=str(tmp_path / "a" / "last.safetensors")))
    old, new = source.model.state_dict(), t.model.state_dict()
    assert new["enhancement.residual.log_gain"].shape == (4, 40)
    assert new["enhancement.residual.g_a.stages.1.conv.weight"].shape == (24, 24, 5, 5)
    for key in old:
        if key.startswith("enhancement.residual.g_a."):  # the old units, in place
            assert torch.equal(new[key][tuple(slice(0, s) for s in old[key].shape)], old[key]), key
        elif not key.startswith("enhancement.residual.") or "entropy_bottleneck" in key:
            assert torch.equal(new[key], old[key]), key
    assert t.progress["joint"] == source.progress["joint"]
    assert t.start_lr == 0.0 and not t.opt.state
    carried = t.progress["joint"]["seconds"]
    assert 0.03 * 60 <= carried < 0.03 * 60 + 5
    # The schedule's clock: full rate for the cycle's first 60 %, whatever the carried hours.
    assert t.schedule_frac(carried) == pytest.approx(max(0.0, carried - 0.03 * 60) / (0.06 * 60))
    assert t.schedule_frac(0.09 * 60) == pytest.approx(1.0)
    assert Trainer(args(data, tmp_path / "c", "joint", minutes=0.1)).schedule_frac(3.0) == 0.5
    before = params(t)
    t.run()
    rows = "enhancement.residual.g_a.stages.3.conv.weight"
    assert not torch.equal(before[rows][24:], params(t)[rows][24:])
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["preset"] == "tiny-rc"


def test_bf16_autocast_keeps_entropy_models_and_loss_in_float32() -> None:
    """`--precision bf16`: the transforms run in bfloat16, yet likelihoods, reconstructions and
    the loss are float32 and the gradient points where the float32 one does."""
    from compass_serve.codec.model import Compass
    from compass_serve.codec.registry import PRESETS
    from compass_serve.training.train import rd_loss

    torch.manual_seed(0)
    model = Compass(PRESETS["tiny"]).train()
    images = [torch.rand(2, 3, s, s) for s in (24, 40, 64)]
    q = torch.tensor([0, 2])

    def loss_and_grad(bf16: bool) -> tuple[float, torch.Tensor, list[dict]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same quantisation noise in both passes
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs = model(images, q)
            loss = sum(rd_loss(o["likelihoods"], o["x_hat"], x, torch.tensor(0.01))[0].mean()
                       for o, x in zip(outs, images, strict=True))
        assert loss.dtype == torch.float32
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return float(loss.detach()), grad, outs

    loss32, grad32, _ = loss_and_grad(False)
    loss16, grad16, outs = loss_and_grad(True)
    for out in outs:
        assert out["x_hat"].dtype == torch.float32
        assert all(lik.dtype == torch.float32 for lik in out["likelihoods"].values())
    assert torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 0.02 * loss32
    cosine = torch.nn.functional.cosine_similarity(grad16, grad32, dim=0)
    assert cosine > 0.95, cosine

    # Every entropy model call under autocast computes exactly what float32 computes from the
    # same inputs (eval mode: rounding instead of noise, so the calls can be repeated).
    from compressai.entropy_models import EntropyModel

    calls: list[tuple[torch.nn.Module, tuple, tuple]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: calls.append((mod, i, o)))
             for m in model.modules() if isinstance(m, EntropyModel)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(images, q)
    for h in hooks:
        h.remove()
    assert len(calls) == 6  # z and y of the base and of both enhancement layers
    with torch.no_grad():
        for module, inputs, (_, likelihood) in calls:
            assert all(t.dtype == torch.float32 for t in inputs if isinstance(t, torch.Tensor))
            assert torch.equal(module(*inputs)[1], likelihood)


def test_bf16_training_trains_the_stage_and_rejects_unknown_precisions(
    data: Path, tmp_path: Path
) -> None:
    t = Trainer(args(data, tmp_path, "joint", precision="bf16"))
    before = params(t)
    t.run()
    after = params(t)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith(TRAINS["joint"]) for n in changed)
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # float32 master weights
    row = list(csv.DictReader((tmp_path / "log.csv").open()))[-1]
    assert 0 < float(row["val_loss"]) < float("inf")
    with pytest.raises(ValueError, match="precision"):
        Trainer(args(data, tmp_path / "x", "joint", precision="fp16"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_after_its_step_and_saves_it(
    data: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    # A budget the test would never wait out: only the signal ends this run.
    t = Trainer(args(data, tmp_path, "residual", minutes=30.0))
    step = t.step
    calls = 0

    def step_then_signal() -> dict[str, float]:
        nonlocal calls
        calls += 1
        stats = step()
        if calls == 3:
            os.kill(os.getpid(), signum)
        return stats

    t.step = step_then_signal  # type: ignore[method-assign]
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert t.run() is False  # stopped, not finished
    assert calls == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    saved = json.loads((tmp_path / "progress.json").read_text())["residual"]
    assert saved["steps"] == 3 and 0 < saved["seconds"] < 30 * 60
    weights = load_file(str(tmp_path / "last.safetensors"))
    trained = state_dict_for_save(t.model)
    assert all(torch.equal(weights[k], trained[k]) for k in trained)
    assert (tmp_path / "optimizer-residual.pt").exists()
    # The resume picks up at step 3 with the saved weights.
    resumed = Trainer(args(data, tmp_path, "residual", minutes=30.0))
    assert resumed.stage_state["steps"] == 3
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in t.model.state_dict().items())
