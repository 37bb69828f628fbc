"""Learning curve: Kodak PSNR at a fixed rate against training hours, from a run's snapshots.

Snapshots are written at every validation of `compass-serve train`; this only reports on them
(Kodak is never used to select a model). Backbone-stage snapshots are measured as the
single-layer codec on the full image, joint-stage ones as the 3-layer stream's top layer with
cumulative bits, each at every trained quality; PSNR at `rate` bpp is interpolated linearly in
log-rate between the qualities that bracket it.
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


def psnr_at_rate(points: list[tuple[float, float]], rate: float) -> float:
    pts = sorted(points)
    rates = np.log([p[0] for p in pts])
    if not rates[0] <= np.log(rate) <= rates[-1]:
        return float("nan")
    return float(np.interp(np.log(rate), rates, [p[1] for p in pts]))


def snapshot_curve(run: Path, data: Path, rate: float, limit: int, preset: str = "lite",
                   done: dict[str, dict] | None = None) -> list[dict]:
    """One row per snapshot; `done` holds rows measured earlier (by snapshot name, same images),
    so a curve can be brought up to date while training goes on."""
    paths = list_images(data)[:limit]
    images = [load_rgb(p) for p in paths]
    names = [p.name for p in paths]
    rows = []
    for snap in tqdm(sorted((run / "snapshots").glob("*.safetensors")), desc="snapshots"):
        old = (done or {}).get(snap.name)
        if old is not None and old.get("images") == names:
            rows.append(old | {"psnr_at_rate": psnr_at_rate([tuple(p) for p in old["points"]], rate)})
            continue
        with safe_open(str(snap), "pt") as fh:
            meta = fh.metadata()
        if meta["stage"] not in ("backbone", "joint"):
            continue
        model = build(PRESETS[preset], load_file(str(snap)))
        codec = Codec(model, preset, bytes(8))
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
    return rows


def plot_curve(rows: list[dict], rate: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    labels = {"backbone": "stage 1: single-layer backbone (full image)",
              "joint": "stage 4: COMPASS 3 layers, top layer (cumulative bits)"}
    for stage, style in (("backbone", "o-"), ("joint", "s-")):
        pts = [(r["hours"], r["psnr_at_rate"]) for r in rows if r["stage"] == stage]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=labels[stage])
    ax.set_xlabel("training hours (2-core CPU)")
    ax.set_ylabel(f"Kodak RGB PSNR at {rate:g} bpp (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curve(run: Path, data: Path, out: Path, rate: float = 0.5, limit: int = 6,
                   preset: str = "lite") -> list[dict]:
    cache = out.with_suffix(".json")
    done = {r["snapshot"]: r for r in json.loads(cache.read_text())} if cache.exists() else {}
    rows = snapshot_curve(run, data, rate, limit, preset, done=done)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot_curve(rows, rate, out, f"learning curve ({limit} Kodak images)")
    return rows
