"""Learning curve: Kodak PSNR at a fixed rate against training hours, from a run's snapshots.

Snapshots are written at every validation of `compass-serve train`; this only reports on them
(Kodak is never used to select a model). Backbone-stage snapshots are measured as the
single-layer codec on the full image, residual- and joint-stage ones as the 3-layer stream's
top layer with cumulative bits, each at every trained quality; PSNR at `rate` bpp is
interpolated linearly in log-rate between the qualities that bracket it.

Training spans sessions on fresh machines, so the curve keeps the rows it measured for
snapshots that are no longer on disk: the JSON beside the plot is the curve's record.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from compass_serve.codec.coder import Codec
from compass_serve.codec.registry import PRESETS, build
from compass_serve.evaluation.run import LADDER, code_compass, code_single, ladder_for
from compass_serve.imageio import load_rgb
from compass_serve.training.data import list_images
from compass_serve.training.train import run_preset


def psnr_at_rate(points: list[tuple[float, float]], rate: float) -> float:
    pts = sorted(points)
    rates = np.log([p[0] for p in pts])
    if not rates[0] <= np.log(rate) <= rates[-1]:
        return float("nan")
    return float(np.interp(np.log(rate), rates, [p[1] for p in pts]))


# Stages whose snapshots are measured as the whole 3-layer COMPASS stream; with the backbone,
# the stages a learning curve shows (LIFF pre-training measures only a prediction).
ENHANCEMENT_STAGES = ("residual", "joint", "filter")
CURVE_STAGES = ("backbone", *ENHANCEMENT_STAGES)


def _measurable(snapshots: list[Path], every: int) -> list[tuple[Path, dict[str, str]]]:
    """(snapshot, metadata) for every `every`-th snapshot of each curve stage, and always each
    stage's last one."""
    by_stage: dict[str, list[tuple[Path, dict[str, str]]]] = {}
    for snap in snapshots:
        with safe_open(str(snap), "pt") as fh:
            meta = fh.metadata()
        if meta["stage"] in CURVE_STAGES:
            by_stage.setdefault(meta["stage"], []).append((snap, meta))
    keep = [s for snaps in by_stage.values() for i, s in enumerate(snaps)
            if i % every == 0 or i == len(snaps) - 1]
    return sorted(keep, key=lambda s: s[0])


def _at_rate(row: dict, rate: float) -> dict:
    """A measured row with its PSNR at `rate` (re-derived: the rate may differ from last time)."""
    return row | {"psnr_at_rate": psnr_at_rate([tuple(p) for p in row["points"]], rate)}


def snapshot_curve(run: Path, data: Path, rate: float, limit: int, preset: str = "lite",
                   done: dict[str, dict] | None = None, every: int = 1) -> list[dict]:
    """One row per snapshot (every `every`-th of each stage); `done` holds rows measured
    earlier (by snapshot name, same images), so a curve can be brought up to date while
    training goes on; rows of snapshots not measured this time are kept."""
    paths = list_images(data)[:limit]
    images = [load_rgb(p) for p in paths]
    names = [p.name for p in paths]
    done = done or {}
    snapshots = sorted((run / "snapshots").glob("*.safetensors"))
    measurable = _measurable(snapshots, every)
    selected = {snap.name for snap, _meta in measurable}
    # Rows of snapshots not measured this time (gone with an earlier machine, or skipped by
    # `every`) are kept: a measured row is never dropped.
    rows = [_at_rate(r, rate) for name, r in done.items()
            if name not in selected and r.get("images") == names]
    for snap, meta in tqdm(measurable, desc="snapshots"):
        old = done.get(snap.name)
        if old is not None and old.get("images") == names:
            rows.append(_at_rate(old, rate))
            continue
        model = build(PRESETS[preset], load_file(str(snap)))
        # A stream's model field names a model-store entry (at most 32 bytes), not a preset:
        # a snapshot is neither shipped nor decoded elsewhere, so it codes under a fixed name.
        codec = Codec(model, "snapshot", bytes(8))
        points = []
        for q in range(1, codec.qualities + 1):
            rs, ps = [], []
            for img in images:
                if meta["stage"] == "backbone":
                    n, p = code_single(codec, img, q)
                    rs.append(n * 8 / (img.width * img.height))
                    ps.append(p)
                else:
                    lad = ladder_for(img, [max(1, round(img.width * s)) for s in LADDER])
                    b, p = code_compass(codec, img, lad, q)[-1]
                    rs.append(b)
                    ps.append(p)
            points.append((float(np.mean(rs)), float(np.mean(ps))))
        rows.append({"snapshot": snap.name, "stage": meta["stage"], "step": int(meta["step"]),
                     "hours": float(meta["hours"]), "points": points, "images": names,
                     "psnr_at_rate": psnr_at_rate(points, rate)})
    return sorted(rows, key=lambda r: r["hours"])


def plot_curve(rows: list[dict], rate: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    backbone = [(r["hours"], r["psnr_at_rate"]) for r in rows if r["stage"] == "backbone"]
    if backbone:
        ax.plot(*zip(*backbone, strict=True), "o-", label="stage 1: single-layer backbone (full image)")
    compass = [r for r in rows if r["stage"] in ENHANCEMENT_STAGES]
    if compass:
        ax.plot([r["hours"] for r in compass], [r["psnr_at_rate"] for r in compass], "-",
                color="C1", label="COMPASS 3 layers, top layer (cumulative bits)")
        for stage, marker, name in (("joint", "s", "joint LIFF + RC"),
                                    ("residual", "^", "RC only (LIFF frozen)"),
                                    ("filter", "D", "post-filter only (all else frozen)")):
            pts = [(r["hours"], r["psnr_at_rate"]) for r in compass if r["stage"] == stage]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color="C1", linestyle="none",
                        fillstyle="full" if stage == "joint" else "none",
                        label=f"  snapshots: {name}")
    ax.set_xlabel("training hours (2-core CPU)")
    ax.set_ylabel(f"Kodak RGB PSNR at {rate:g} bpp (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curve(run: Path, data: Path, out: Path, rate: float = 0.5, limit: int = 6,
                   preset: str | None = None, every: int = 1) -> list[dict]:
    """Measure a run's snapshots (with the preset it was trained with, unless told) and plot
    them together with every row `out`'s JSON record already holds."""
    preset = preset or run_preset(run)
    cache = out.with_suffix(".json")
    done = {r["snapshot"]: r for r in json.loads(cache.read_text())} if cache.exists() else {}
    rows = snapshot_curve(run, data, rate, limit, preset, done=done, every=every)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot_curve(rows, rate, out, f"learning curve ({limit} Kodak images)")
    return rows
