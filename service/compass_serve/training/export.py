"""Export a training run (runs/<name>/) into the model store with its manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from safetensors.torch import load_file

from compass_serve.codec.registry import PRESETS, ModelInfo, build, save_model

DATA_NOTE = (
    "../shared/data/train (515 photos: Urban100, Sun-Hays80, BSDS500, PolyU, McMaster, ImageNet "
    "samples; see shared/data/PROVENANCE.md); every 20th image held out for model selection; "
    "Kodak never used for training or selection"
)
LICENSE_NOTE = (
    "Trained on research / non-commercial datasets: these weights carry that restriction."
)


def export_run(run: Path, name: str, weights: str = "last", preset: str | None = None,
               store: Path | None = None) -> ModelInfo:
    progress = json.loads((run / "progress.json").read_text())
    preset = preset or progress.get("preset", "lite")
    model = build(PRESETS[preset], load_file(str(run / f"{weights}.safetensors")))
    stages = {k: {"steps": int(v["steps"]), "hours": round(v["seconds"] / 3600, 3)}
              for k, v in progress.items() if isinstance(v, dict)}
    val = {}
    log = run / "log.csv"
    if log.exists():
        with log.open() as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            # The row of the exported weights: the last validation, or for "best" the lowest
            # held-out loss of the stage that wrote best.safetensors last (best is per stage).
            last = rows[-1]
            if weights == "best":
                stage_rows = [r for r in rows if r["stage"] == last["stage"]]
                last = min(stage_rows, key=lambda r: float(r["val_loss"]))
            val = {k: float(v) for k, v in last.items() if k.startswith("q") or k == "val_loss"}
            val["stage"] = last["stage"]
            val["note"] = ("held-out slice, 256-px centre crops, ladder 64/128/256, "
                           "estimated bits from the entropy model's likelihoods")
    return save_model(
        model, name, preset, store,
        training={"stages": stages, "total_hours": round(sum(s["hours"] for s in stages.values()),
                                                         3),
                  "machine": "2-core CPU (no GPU)", "weights": weights, "validation": val},
        data=DATA_NOTE, license=LICENSE_NOTE,
    )
