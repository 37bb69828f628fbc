"""The evaluation pipeline end to end on the tiny model (fast), and the Bjontegaard maths."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compass_serve.codec.coder import Codec
from compass_serve.evaluation import anchors, published, run
from compass_serve.evaluation.bd import bd_rate
from tests.conftest import photo


def test_bd_rate_of_a_scaled_curve() -> None:
    rates = [0.2, 0.4, 0.8, 1.6]
    psnrs = [26.0, 29.0, 32.0, 35.0]
    assert bd_rate(rates, psnrs, rates, psnrs) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(rates, psnrs, [r * 0.9 for r in rates], psnrs) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate(rates, psnrs, [r * 1.25 for r in rates], psnrs) == pytest.approx(25.0, abs=1e-6)


def _result(scale: float) -> dict:
    """An eval result whose COMPASS top layer needs `scale` x the bits of a reference curve,
    the backbone 1.1 x and simulcast 1.5 x (constant ratios: exact BD-rates)."""
    rates, psnrs = [0.1, 0.2, 0.4, 0.8, 1.6], [24.0, 27.0, 30.0, 33.0, 36.0]

    def pt(r: float, p: float) -> dict:
        return {"bpp": r, "psnr": p}
    levels = [(f"{i + 1}", r, p) for i, (r, p) in enumerate(zip(rates, psnrs, strict=True))]
    return {
        "model": "m", "weights_id": "00",
        "compass": {q: [pt(4 * r, p - 2), pt(scale * r, p)] for q, r, p in levels},
        "single_layer": {q: pt(1.1 * r, p) for q, r, p in levels},
        "simulcast": {q: [pt(4 * r, p - 2), pt(1.5 * r, p)] for q, r, p in levels},
    }


def test_bd_over_a_subset_of_qualities(tmp_path: Path) -> None:
    res = _result(1.0)
    sub = run.summarize(res, ["2", "3", "4"])
    trimmed = {**res, "compass": {q: res["compass"][q] for q in ("2", "3", "4")}}
    assert sub == run.summarize(trimmed)
    assert sub["single_layer"] == pytest.approx((1 / 1.1 - 1) * 100, abs=1e-6)
    with pytest.raises(KeyError, match="not in the result"):
        run.summarize(res, ["9"])

    # The CLI: a stored result, a quality range, another model's result as one more anchor.
    mine, other = tmp_path / "mine.json", tmp_path / "other.json"
    mine.write_text(json.dumps(res))
    other.write_text(json.dumps(_result(1.25)))
    cmd = [sys.executable, "-m", "compass_serve.cli", "bd", str(mine)]
    out = subprocess.run([*cmd, "--qualities", "2,3,4", "--against", str(other)],
                         capture_output=True, text=True, check=True).stdout
    assert "qualities ['2', '3', '4']" in out and "simulcast" in out
    assert out.strip().splitlines()[-1].endswith("-20.0 %")  # 1/1.25 of the other's bits
    bad = subprocess.run([*cmd, "--qualities", "9"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not in the result" in bad.stderr
    gone = subprocess.run([*cmd, "--against", str(tmp_path / "missing.json")], capture_output=True,
                          text=True)
    assert gone.returncode == 2 and "missing.json" in gone.stderr and "Traceback" not in gone.stderr
    within = subprocess.run([*cmd, "--psnr", "26,29", "--against", str(other)],
                            capture_output=True, text=True, check=True).stdout
    assert "PSNR 26-29 dB" in within and within.strip().endswith("-20.0 %")
    wrong = subprocess.run([*cmd, "--psnr", "29,26"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "LOW < HIGH" in wrong.stderr


def test_evaluate_writes_every_table(tiny_codec: Codec, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "kodak"
    data.mkdir()
    photo(96, 64).save(data / "img0.png")
    calls: list[tuple[int, int]] = []
    real = run.code_single

    def counting(codec: Codec, ref, q: float, refine_steps: int = 0):  # type: ignore[no-untyped-def]
        calls.append(ref.size)
        return real(codec, ref, q, refine_steps)

    monkeypatch.setattr(run, "code_single", counting)
    res = run.evaluate(tiny_codec, data, tmp_path / "out", qualities=[1.0, 4.0], with_tables=True)

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["images"] == 1 and (tmp_path / "out" / "rd.png").stat().st_size > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "single_layer" in md and "two-layer 1.2x" in md
    for q in ("1", "4"):
        layers = res["compass"][q]
        assert len(layers) == 3 and all(p["bpp"] > 0 and math.isfinite(p["psnr"]) for p in layers)
        # Simulcast codes every layer on its own, the top one exactly as single-layer does.
        assert res["simulcast"][q][-1]["bpp"] > res["single_layer"][q]["bpp"]
        assert res["simulcast"][q][-1]["psnr"] == res["single_layer"][q]["psnr"]
    assert set(res["anchors"]) >= {"jpeg"}
    assert len(res["scale_tables"]) == 10
    for table in res["scale_tables"].values():
        assert all(s["bpp"] > 0 for s in table["simulcast"])
    # The whole image is coded once per quality; simulcast's top layer and the tables reuse it.
    assert calls.count((96, 64)) == 2
    assert len(res["timing"]["decode_s_up_to_layer"]) == 3 and res["timing"]["encode_s_all_layers"] > 0
    assert res["timing"]["decode_repeats"] == 3
    assert np.isfinite(res["ablation"]["liff"][0]["psnr"])


def test_anchor_effort_max_uses_the_slow_settings() -> None:
    img = photo(96, 64, seed=2)
    assert "webp" in anchors.available()  # the README's anchors need it
    for codec in anchors.available():
        assert anchors.code(img, codec, 50, "max")[1].size == img.size
    assert anchors.code(img, "webp", 50, "max")[0] != anchors.code(img, "webp", 50)[0]
    with pytest.raises(ValueError, match="effort"):
        anchors.code(img, "jpeg", 50, "fast")


def test_encoder_refinement_reaches_every_coding(tiny_codec: Codec, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "kodak"
    data.mkdir()
    photo(64, 48).save(data / "img0.png")
    steps: list[int] = []
    real = Codec.encode

    def spy(self: Codec, image, **kw):  # type: ignore[no-untyped-def]
        steps.append(kw.get("refine", 0))
        return real(self, image, **kw)

    monkeypatch.setattr(Codec, "encode", spy)
    res = run.evaluate(tiny_codec, data, tmp_path / "out", qualities=[2.0], with_tables=True,
                       refine_steps=2)
    # COMPASS, the backbone anchors, the ablation, the tables and the timing: all refined alike.
    assert len(steps) > 20 and set(steps) == {2}
    assert res["refine_steps"] == 2 and res["anchor_effort"] == "max"
    assert "refinement 2 steps" in (tmp_path / "out" / "results.md").read_text()


def test_learning_curve_from_snapshots_reuses_measured_rows(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    from compass_serve.codec.registry import PRESETS, build, state_dict_for_save
    from compass_serve.evaluation import curve

    data = tmp_path / "kodak"
    data.mkdir()
    photo(64, 48).save(data / "img0.png")
    snaps = tmp_path / "run" / "snapshots"
    snaps.mkdir(parents=True)
    for step, hours in ((100, 0.5), (200, 1.0)):
        model = build(PRESETS["tiny"])
        model.update()
        save_file(state_dict_for_save(model), str(snaps / f"joint-{step:06d}.safetensors"),
                  metadata={"stage": "joint", "step": str(step), "hours": str(hours)})
    out = tmp_path / "curve.png"
    # The run's own record names its preset (the trainer writes it): no --preset needed. Preset
    # names may run past a stream's 32-byte model field (session 31's did).
    long = "tiny-" + "x" * 40
    monkeypatch.setitem(PRESETS, long, PRESETS["tiny"])
    (tmp_path / "run" / "progress.json").write_text(json.dumps({"preset": long}))
    rows = curve.learning_curve(tmp_path / "run", data, out, rate=0.5, limit=1)
    assert [(r["step"], r["hours"]) for r in rows] == [(100, 0.5), (200, 1.0)]
    assert all(len(r["points"]) == 4 and r["images"] == ["img0.png"] for r in rows)
    assert out.stat().st_size > 0 and out.with_suffix(".json").exists()

    def no_coding(*_a: object, **_k: object) -> None:
        raise AssertionError("a measured snapshot was coded again")

    # A later session on a fresh machine: the first snapshot is gone with the old machine, a
    # residual-stage snapshot is new. Old rows are kept from the record, the new one is measured.
    (snaps / "joint-000100.safetensors").unlink()
    model = build(PRESETS["tiny"])
    model.update()
    save_file(state_dict_for_save(model), str(snaps / "residual-000050.safetensors"),
              metadata={"stage": "residual", "step": "50", "hours": "1.5"})
    later = curve.learning_curve(tmp_path / "run", data, out, rate=0.5, limit=1, preset="tiny")
    assert [(r["stage"], r["hours"]) for r in later] == [("joint", 0.5), ("joint", 1.0),
                                                        ("residual", 1.5)]
    assert json.dumps(later[0]["points"]) == json.dumps(rows[0]["points"]) and len(later[2]["points"]) == 4

    monkeypatch.setattr(curve, "code_compass", no_coding)
    again = curve.learning_curve(tmp_path / "run", data, out, rate=0.5, limit=1, preset="tiny")
    assert json.dumps([r["points"] for r in again]) == json.dumps([r["points"] for r in later])
    # A coarser `every` skips snapshots, but never drops the rows measured for them.
    monkeypatch.undo()
    for step, hours in ((300, 1.75), (400, 2.0)):
        save_file(state_dict_for_save(model), str(snaps / f"residual-{step:06d}.safetensors"),
                  metadata={"stage": "residual", "step": str(step), "hours": str(hours)})
    full = curve.learning_curve(tmp_path / "run", data, out, rate=0.5, limit=1, preset="tiny")
    monkeypatch.setattr(curve, "code_compass", no_coding)
    coarse = curve.learning_curve(tmp_path / "run", data, out, rate=0.5, limit=1, preset="tiny",
                                  every=2)  # selects residual 50 and 400, skips 300
    assert [r["hours"] for r in coarse] == [r["hours"] for r in full] == [0.5, 1.0, 1.5, 1.75, 2.0]


def test_learning_curve_measures_every_nth_snapshot_and_the_last(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from compass_serve.evaluation.curve import _measurable

    paths = []
    for stage, n in (("backbone", 3), ("liff", 2), ("residual", 6)):
        for i in range(n):
            p = tmp_path / f"{stage}-{i:06d}.safetensors"
            save_file({"w": torch.zeros(1)}, str(p), metadata={"stage": stage, "step": str(i)})
            paths.append(p)
    names = [p.name for p, _meta in _measurable(paths, every=4)]
    assert names == ["backbone-000000.safetensors", "backbone-000002.safetensors",
                     "residual-000000.safetensors", "residual-000004.safetensors",
                     "residual-000005.safetensors"]


def test_heldout_plot_keeps_backbone_rows_apart(tmp_path: Path) -> None:
    from compass_serve.evaluation.plots import heldout_series, learning_curve

    rows = [
        {"stage": "residual", "hours": "5.9", "q1_psnr": "26.8", "q2_psnr": "28.0"},
        {"stage": "backbone", "hours": "6.1", "q1_psnr": "24.5", "q2_psnr": "25.4"},
        {"stage": "residual", "hours": "7.6", "q1_psnr": "26.9", "q2_psnr": ""},
    ]
    series = heldout_series(rows)
    assert series[("q1", False)] == [(5.9, 26.8), (7.6, 26.9)]
    assert series[("q1", True)] == [(6.1, 24.5)]
    assert series[("q2", False)] == [(5.9, 28.0)]  # an empty cell is no point
    out = tmp_path / "curve.png"
    learning_curve(rows, out, "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bd_rate_within_a_psnr_interval() -> None:
    rates = [0.1, 0.2, 0.4, 0.8, 1.6]
    psnrs = [25.0, 27.0, 29.0, 31.0, 33.0]
    # The test curve is 10 % cheaper below 29 dB and 30 % dearer above: the interval decides.
    test = [r * (0.9 if p < 29 else 1.3 if p > 29 else 1.0) for r, p in zip(rates, psnrs, strict=True)]
    whole = bd_rate(rates, psnrs, test, psnrs)
    low = bd_rate(rates, psnrs, test, psnrs, within=(25.0, 28.0))
    high = bd_rate(rates, psnrs, test, psnrs, within=(30.0, 40.0))  # clipped to the overlap
    assert low < whole < high
    assert bd_rate(rates, psnrs, rates, psnrs, within=(26.0, 30.0)) == pytest.approx(0.0, abs=1e-9)
    assert np.isnan(bd_rate(rates, psnrs, test, psnrs, within=(34.0, 35.0)))


def test_bd_against_published_curves(tmp_path: Path) -> None:
    """`bd --published`: COMPASS against CompressAI's published Kodak curves, and those curves
    against the eval's own anchors (constant bit ratios: exact BD-rates)."""
    mbt = published.published_curve("mbt2018-mean")

    def scaled(k: float) -> list[dict]:
        return [{"bpp": k * p["bpp"], "psnr": p["psnr"]} for p in mbt]
    res = {"model": "m", "weights_id": "00",
           "compass": {f"{i + 1}": [p] for i, p in enumerate(scaled(1.25))},
           "single_layer": {f"{i + 1}": p for i, p in enumerate(scaled(1.1))},
           "simulcast": {f"{i + 1}": [p] for i, p in enumerate(scaled(1.5))},
           "anchors": {"avif": {"single": scaled(0.5), "simulcast": []}}}
    assert published.published_vs_anchors(res)["mbt2018-mean"]["avif"] == pytest.approx(100.0)
    path = tmp_path / "res.json"
    path.write_text(json.dumps(res))
    out = subprocess.run([sys.executable, "-m", "compass_serve.cli", "bd", str(path), "--published"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0] + " " + line.split()[1]: line for line in out.splitlines()
            if line.startswith("  published")}
    assert rows["published mbt2018-mean"].endswith("+25.0 %")  # 1.25 x its bits
    assert "mbt2018-mean   avif +100.0 %" in out
    plain = subprocess.run([sys.executable, "-m", "compass_serve.cli", "bd", str(path)],
                           capture_output=True, text=True, check=True).stdout
    assert "published" not in plain.lower()


def test_the_ablation_compares_predictors_without_the_post_filter(
        tiny_codec: Codec, tmp_path: Path) -> None:
    """LIFF against bicubic with the same chain: the post-filter is off for both predictors (it
    was trained on LIFF's predictions), and on again afterwards."""
    data = tmp_path / "kodak"
    data.mkdir()
    photo(96, 64).save(data / "img0.png")
    enh = tiny_codec.model.enhancement
    pf = enh.post_filter
    assert pf is not None
    ev = run.Evaluation(tiny_codec, sorted(data.iterdir()), tmp_path / "out", [1.0, 4.0])
    with torch.no_grad():
        last = pf.net[-1]
        saved = last.weight.clone()
        last.weight.normal_(0, 0.5)  # a filter that changes what it shows
        try:
            res = ev.ablation()
            assert enh.post_filter is pf
            enh.post_filter = None
            plain = {p: (setattr(enh, "predictor", p), ev._el_curve(p))[1]
                     for p in ("liff", "bicubic")}
        finally:
            enh.post_filter, enh.predictor = pf, "liff"
            last.weight.copy_(saved)
    assert res["liff"] == plain["liff"] and res["bicubic"] == plain["bicubic"]
