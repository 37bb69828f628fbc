"""RD plots (matplotlib, PNG) of an evaluation's results."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D


def rd_plot(res: dict, path: Path) -> None:
    """One panel per ladder layer: cumulative bpp against that layer's PSNR."""
    n = len(res["ladder_scales"])
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.4), squeeze=False)
    qs = list(res["compass"])
    for k, ax in enumerate(axes[0]):
        top = k == n - 1
        comp = [res["compass"][q][k] for q in qs]
        ax.plot([p["bpp"] for p in comp], [p["psnr"] for p in comp], "o-", lw=2,
                label=f"COMPASS ({res['model']})", color="C3")
        sim = [res["simulcast"][q][k] for q in qs]
        ax.plot([p["bpp"] for p in sim], [p["psnr"] for p in sim], "s--", label="simulcast (own)",
                color="C0")
        if top:
            sl = [res["single_layer"][q] for q in qs]
            ax.plot([p["bpp"] for p in sl], [p["psnr"] for p in sl], "^:",
                    label="single-layer (own)", color="C2")
        for i, (name, a) in enumerate(res.get("anchors", {}).items()):
            pts = [s["layers"][k] for s in a["simulcast"]]
            ax.plot([p["bpp"] for p in pts], [p["psnr"] for p in pts], "--", alpha=0.6,
                    color=f"C{4 + i}", label=f"{name} simulcast")
            if top:
                ax.plot([p["bpp"] for p in a["single"]], [p["psnr"] for p in a["single"]], "-",
                        alpha=0.9, color=f"C{4 + i}", label=f"{name}")
        scale = res["ladder_scales"][k]
        ax.set_title(f"layer {k} ({scale:g}x), cumulative rate")
        ax.set_xlabel("bits per pixel of this layer (all bytes up to it)")
        ax.set_ylabel("RGB PSNR (dB)")
        ax.set_xlim(0, max(2.0, max(p["bpp"] for p in comp) * 1.1) if top else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['data']} ({res['images']} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_series(rows: list[dict]) -> dict[tuple[str, bool], list[tuple[float, float]]]:
    """(quality, is_backbone) -> [(hours, held-out PSNR)] from a run's log.csv rows. Backbone
    rows measure the single-layer codec, the other stages the 3-layer chain's top layer, so
    they are separate series, never one line."""
    series: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("q") and k.endswith("_psnr") and v:
                key = (k.removesuffix("_psnr"), r.get("stage") == "backbone")
                series.setdefault(key, []).append((float(r["hours"]), float(v)))
    return series


def learning_curve(rows: list[dict], path: Path, title: str) -> None:
    """Held-out PSNR per quality against training hours (dashed: the backbone stage)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    series = heldout_series(rows)
    colour = {q: f"C{i}" for i, q in enumerate(sorted({q for q, _ in series}))}
    for (q, backbone), pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o--" if backbone else "o-", ms=3,
                color=colour[q])
    ax.set_xlabel("training hours (all stages)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # One entry per quality (colour) and one per line style, outside the axes: a legend with a
    # line per series hid the lowest curves.
    handles = [Line2D([], [], color=c, marker="o", ms=3, label=str(q)) for q, c in colour.items()]
    handles += [Line2D([], [], color="k", ls="-", label="top layer"),
                Line2D([], [], color="k", ls="--", label="backbone (single layer)")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
