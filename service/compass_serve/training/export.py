"""Export a training run (runs/<name>/) into the model store with its manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from safetensors.torch import load_file

from compass_serve.codec.registry import PRESETS, ModelInfo, build, save_model
from compass_serve.training.train import LOG_NAME, run_preset

DATA_NOTE = (
    "../shared/data/train (515 photos: Urban100, Sun-Hays80, BSDS500, PolyU, McMaster, ImageNet "
    "samples; see shared/data/PROVENANCE.md); every 20th image held out for model selection; "
    "Kodak never used for training or selection"
)
LICENSE_NOTE = (
    "Trained on research / non-commercial datasets: these weights carry that restriction."
)


def export_run(run: Path, name: str, weights: str = "last", preset: str | None = None,
               store: Path | None = None, log: Path | None = None) -> ModelInfo:
    """`log` is the validation log to read (default: the run's own); a committed log that a
    run's rows were appended to serves as well, so no staging directory is needed."""
    # The record saved with the exported weights (best.progress.json), else the run's latest.
    record = run / f"{weights}.progress.json"
    progress = json.loads((record if record.exists() else run / "progress.json").read_text())
    preset = preset or run_preset(run)
    model = build(PRESETS[preset], load_file(str(run / f"{weights}.safetensors")))
    stages = {k: {"steps": int(v["steps"]), "hours": round(v["seconds"] / 3600, 3)}
              for k, v in progress.items() if isinstance(v, dict)}
    val = {}
    log = log or run / LOG_NAME
    if log.exists():
        with log.open() as fh:
            rows = list(csv.DictReader(fh))
        if rows:
            # The row of the exported weights: the last validation, or for "best" the row at the
            # step its saved record names. Without that record, the row whose loss is the stage's
            # recorded best; the log rounds to 4 places, so a tie is guessed as the last row, which
            # can be wrong (a later loss within 5e-5 above the best ties it).
            last = rows[-1]
            if weights == "best":
                stage = last["stage"]
                stage_rows = [r for r in rows if r["stage"] == stage]
                steps = progress.get(stage, {}).get("steps") if record.exists() else None
                at_step = [r for r in stage_rows if steps is not None and int(r["step"]) == steps]
                if at_step:
                    last = at_step[-1]
                else:
                    target = float(progress.get(f"best_{stage}", 0.0))
                    gap = min(abs(float(r["val_loss"]) - target) for r in stage_rows)
                    last = [r for r in stage_rows
                            if abs(float(r["val_loss"]) - target) == gap][-1]
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
