#!/usr/bin/env bash
# Ship a training run's best weights as `lite`, behind both gates, and rerun every measurement
# the README reports for them, by the project's own commands, in the order the README cites them.
#
#   scripts/ship.sh RUN LOG OLD_RESULTS
#
# RUN          the run directory (best.safetensors, best.progress.json, log.csv)
# LOG          the committed training log the run's new rows are appended to (rename it first
#              if its name carries the session range)
# OLD_RESULTS  the shipped model's Kodak results.json (`git show REV:docs/eval/results.json`)
#
# Gate 1 (held-out): the run's best validation loss, at the log's four places, must be below the
# shipped manifest's. Gate 2 (Kodak): `bd --against OLD_RESULTS` must give COMPASS fewer bits;
# otherwise model_store/ and docs/ are restored from git and the script stops. Every step's
# output goes to runs/ship/<step>.txt as well as the terminal. By hand these steps took about 45
# minutes on a 2-core CPU (session 28); to the Kodak gate, 23 minutes (session 29).
set -euo pipefail
if [[ $# -ne 3 ]]; then
    sed -n '4,9p' "$0" >&2
    exit 2
fi
RUN=$1 LOG=$2 OLD=$3
# A failed gate restores model_store/ and docs/ from git, which would take uncommitted edits too.
if ! git diff --quiet -- model_store docs; then
    echo "uncommitted changes under model_store/ or docs/: commit them first" \
        "(a failed gate restores both from git)" >&2
    exit 2
fi
KODAK=${KODAK:-../shared/data/kodak}
CS=${CS:-.venv/bin/compass-serve}
PY=${PY:-.venv/bin/python}
OUT=runs/ship
mkdir -p "$OUT"
step() {  # step NAME CMD...: run, tee, time
    local name=$1
    shift
    echo "== $(date +%T) $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name took $(((SECONDS - t0) / 60)) min $(((SECONDS - t0) % 60)) s"
}

# Gate 1: the held-out slice (never Kodak) decides whether Kodak is looked at at all.
if ! "$PY" - "$RUN" <<'EOF'
import csv, json, sys
from pathlib import Path
run = Path(sys.argv[1])
with (run / "log.csv").open() as fh:
    stage = list(csv.DictReader(fh))[-1]["stage"]  # the stage the run trained, whose best ships
best = json.loads((run / "best.progress.json").read_text())[f"best_{stage}"]
shipped = json.loads(Path("model_store/lite.json").read_text())["training"]["validation"]["val_loss"]
print(f"held-out: run best ({stage}) {best:.5f} ({best:.4f} logged), shipped {shipped:.4f}")
sys.exit(0 if round(best, 4) < shipped else 1)
EOF
then
    echo "held-out gate failed: not shipped" >&2
    exit 1
fi

# The old weights, for the interleaved timing.
rm -rf runs/store-old && mkdir -p runs/store-old && cp model_store/lite.* runs/store-old/

# The run's rows after the committed log's last step of their stage (each stage counts its own
# steps), then the export reads that log.
"$PY" - "$RUN/log.csv" "$LOG" <<'EOF'
import csv, sys
src, dst = sys.argv[1:]
last: dict[str, int] = {}
with open(dst) as fh:
    for r in csv.DictReader(fh):
        last[r["stage"]] = max(last.get(r["stage"], 0), int(r["step"]))
with open(src) as fh:
    rows = [r for r in csv.DictReader(fh) if int(r["step"]) > last.get(r["stage"], 0)]
with open(dst) as fh:
    fields = next(csv.reader(fh))
with open(dst, "a", newline="") as fh:
    csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore").writerows(rows)
print(f"appended {len(rows)} rows to {dst} (after steps {last})")
EOF
step export "$CS" export --run "$RUN" --name lite --weights best --log "$LOG" \
    --plot docs/learning_curve_heldout.png

step eval "$CS" eval --data "$KODAK" --out docs/eval --write-manifest --threads 2
step bd "$CS" bd docs/eval/results.json --against "$OLD"
# Gate 2: Kodak, against the shipped model's own curve: fewer bits at equal PSNR, by at least
# the 0.1 % that `bd` prints.
gain=$(awk '/^  compass of / {print $(NF-1)}' "$OUT/bd.txt")
if ! awk -v g="$gain" 'BEGIN {exit !(g + 0 < 0)}'; then
    echo "Kodak gate failed (compass of the old weights: ${gain:-?} %): restoring" \
        "model_store/, docs/ and $LOG from git" >&2
    git checkout -- model_store docs "$LOG"
    git clean -fdq model_store
    exit 1
fi
# The same over the old curve's PSNR range (lowest to highest quality's top layer), and below and
# above its middle rate point (q4 of 8), so that the README can say where the bits were saved.
read -r lo mid hi < <("$PY" -c "import json, sys
c = json.load(open(sys.argv[1]))['compass']
top = [c[q][-1]['psnr'] for q in sorted(c, key=float)]
print(f'{top[0]:.2f} {top[len(top) // 2 - 1]:.2f} {top[-1]:.2f}')" "$OLD")
# Each interval for the new result and for the old one (the README's "there" columns), and the
# low end over the lower four levels.
for span in "range $lo,$hi" "low $lo,$mid" "high $mid,$hi"; do
    read -r name psnr <<<"$span"
    step "bd-$name" "$CS" bd docs/eval/results.json --against "$OLD" --psnr "$psnr"
    step "bd-$name-old" "$CS" bd "$OLD" --psnr "$psnr"
done
step bd-low-levels "$CS" bd docs/eval/results.json --qualities 1,2,3,4

# Decode timing, new and old weights interleaved so that the machine's drift hits both.
timing() { "$CS" eval --data "$KODAK" --limit 4 --no-anchors --no-ablation --qualities 5 \
    --out "runs/timing-$1" --threads 2 >/dev/null && grep Timing "runs/timing-$1/results.md"; }
for i in 1 2; do
    step "timing-new-$i" timing "new-$i"
    COMPASS_MODEL_STORE=runs/store-old step "timing-old-$i" timing "old-$i"
done
ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
    step timing-avx2 timing avx2
step decode-breakdown "$PY" benchmarks/decode_breakdown.py

step tables "$CS" eval --data "$KODAK" --out runs/tables --limit 6 --tables --no-anchors \
    --no-ablation --qualities 3,4,5,6 --threads 2
cp runs/tables/results.json runs/tables/results.md runs/tables/rd.png docs/eval/tables/
step curve "$CS" curve --run "$RUN" --every 100
step bytes-per-width "$PY" benchmarks/bytes_per_width.py
step roundtrip bash -c "scripts/kodak_roundtrip.sh '$KODAK' runs/kodak-roundtrip > docs/kodak_roundtrip.md"
echo "shipped $RUN; figures in $OUT/"
