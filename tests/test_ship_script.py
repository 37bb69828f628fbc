"""scripts/ship.sh's two gates, in a scratch git repository with a stand-in `compass-serve`: a run
that is not better on the held-out slice exports nothing, and a failed Kodak gate puts the
shipped weights, docs and the committed log back exactly as git has them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Stands in for the CLI: export rewrites the manifest and archives, eval rewrites the results,
# bd prints the gain the test asks for.
FAKE_CLI = """#!/usr/bin/env bash
set -e
case "$1" in
  export) echo new > model_store/lite.json; echo old > model_store/archive/lite-old.json ;;
  eval) echo '{"new": true}' > docs/eval/results.json ;;
  bd) echo "  avif_single +28.5 %"; echo "  compass of old.json $FAKE_GAIN %" ;;
esac
"""


def scratch_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for d in ("model_store/archive", "docs/eval", "docs/training", "run"):
        (root / d).mkdir(parents=True)
    manifest = {"training": {"validation": {"val_loss": 1.194}}}
    (root / "model_store/lite.json").write_text(json.dumps(manifest))
    (root / "model_store/archive/keep.json").write_text("{}")
    (root / "docs/eval/results.json").write_text('{"old": true}')
    (root / "docs/training/log.csv").write_text("stage,step,val_loss\njoint,10,1.1950\n")
    (root / "run/log.csv").write_text("stage,step,val_loss\njoint,10,1.1950\njoint,20,1.1934\n")
    (root / "old.json").write_text("{}")
    (root / "cli").write_text(FAKE_CLI)
    (root / "cli").chmod(0o755)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    commit(root)
    return root


def commit(root: Path) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"],
                   cwd=root, check=True)


def ship(root: Path, best: float, gain: str, stage: str = "joint"
         ) -> subprocess.CompletedProcess[str]:
    (root / "run/best.progress.json").write_text(json.dumps({f"best_{stage}": best}))
    env = {"PATH": "/usr/bin:/bin", "CS": str(root / "cli"), "PY": sys.executable,
           "FAKE_GAIN": gain, "KODAK": str(root)}
    return subprocess.run(["bash", str(REPO / "scripts/ship.sh"), "run", "docs/training/log.csv",
                           "old.json"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def tracked_state(root: Path) -> dict[str, str]:
    files = ("model_store/lite.json", "docs/eval/results.json", "docs/training/log.csv")
    return {f: (root / f).read_text() for f in files}


def test_a_run_no_better_on_the_held_out_slice_is_not_exported(tmp_path: Path) -> None:
    root = scratch_repo(tmp_path)
    before = tracked_state(root)
    res = ship(root, best=1.19396, gain="-1.0")  # 1.1940 at the log's four places: a tie
    assert res.returncode == 1
    assert "held-out gate failed" in res.stderr
    assert tracked_state(root) == before


def test_a_failed_kodak_gate_restores_weights_docs_and_log(tmp_path: Path) -> None:
    root = scratch_repo(tmp_path)
    before = tracked_state(root)
    res = ship(root, best=1.19344, gain="+0.1")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "appended 1 rows to docs/training/log.csv (after steps {'joint': 10})" in res.stdout
    assert "Kodak gate failed" in res.stderr
    assert tracked_state(root) == before
    # The archive copy export made is gone; what git tracks there is kept.
    assert sorted(p.name for p in (root / "model_store/archive").iterdir()) == ["keep.json"]
    status = subprocess.run(["git", "status", "--porcelain", "model_store", "docs"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    assert status == ""


def test_uncommitted_docs_are_refused_before_anything_runs(tmp_path: Path) -> None:
    """A failed gate restores docs/ from git, so edits not yet committed there stop the script."""
    root = scratch_repo(tmp_path)
    (root / "docs/history.md").write_text("tracked\n")
    commit(root)
    (root / "docs/history.md").write_text("an edit not yet committed\n")
    before = tracked_state(root)
    res = ship(root, best=1.19344, gain="+0.1")
    assert res.returncode == 2
    assert "commit them first" in res.stderr
    assert (root / "docs/history.md").read_text() == "an edit not yet committed\n"
    assert tracked_state(root) == before and not (root / "runs").exists()


def test_a_run_of_another_stage_is_gated_on_its_own_best_and_logged(tmp_path: Path) -> None:
    """A post-filter run counts its own steps from 1: its rows are appended although their step
    numbers are below the committed joint rows', and the gate reads best_filter."""
    root = scratch_repo(tmp_path)
    (root / "run/log.csv").write_text("stage,step,val_loss\nfilter,4,1.1920\nfilter,8,1.1900\n")
    commit(root)
    before = tracked_state(root)
    res = ship(root, best=1.1900, gain="+0.1", stage="filter")
    assert "held-out: run best (filter) 1.19000" in res.stdout, res.stdout + res.stderr
    assert "appended 2 rows" in res.stdout
    assert res.returncode == 1 and "Kodak gate failed" in res.stderr
    assert tracked_state(root) == before
