#!/usr/bin/env bash
# CLI round trip on every Kodak image: encode with the default 3-layer ladder, then decode
# every layer from its own byte prefix (a separate file cut at the layer boundary), and report
# the size and PSNR of each layer (a markdown table on stdout). Usage: scripts/kodak_roundtrip.sh [KODAK_DIR] [OUT_DIR]
set -euo pipefail
KODAK=${1:-../shared/data/kodak}
OUT=${2:-runs/kodak-roundtrip}
CLI=${CLI:-.venv/bin/compass-serve}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for src in "$KODAK"/kodim*.png; do
  name=$(basename "$src" .png)
  "$CLI" encode "$src" "$OUT/$name.cmp" >/dev/null
  "$CLI" info "$OUT/$name.cmp" --json > "$OUT/$name.json"
  n=$("$PY" -c "import json,sys; print(len(json.load(open(sys.argv[1]))['layers']))" "$OUT/$name.json")
  for k in $(seq 0 $((n - 1))); do
    end=$("$PY" -c "import json,sys; l=json.load(open(sys.argv[1]))['layers'][int(sys.argv[2])]; print(l['offset']+l['length'])" "$OUT/$name.json" "$k")
    head -c "$end" "$OUT/$name.cmp" > "$OUT/$name.prefix$k.cmp"
    "$CLI" decode "$OUT/$name.prefix$k.cmp" -o "$OUT/$name.layer$k.png" >/dev/null
  done
  echo "$name: $n layers ok" >&2  # progress on stderr: stdout is the table
done
"$PY" - "$KODAK" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from PIL import Image
from compass_serve.evaluation.run import psnr
kodak, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for meta in sorted(out.glob("kodim*.json")):
    name = meta.stem
    info = json.loads(meta.read_text())
    src = Image.open(kodak / f"{name}.png").convert("RGB")
    cells = []
    for k, layer in enumerate(info["layers"]):
        dec = Image.open(out / f"{name}.layer{k}.png")
        assert dec.size == (layer["width"], layer["height"]), (name, k, dec.size)
        ref = src.resize(dec.size, Image.Resampling.BICUBIC)
        end = layer["offset"] + layer["length"]
        cells.append(f"{layer['width']}x{layer['height']} {end} B {psnr(dec, ref):.2f} dB")
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
print("| image | layer 0 (prefix bytes, PSNR) | layer 1 | layer 2 |")
print("|---|---|---|---|")
print("\n".join(rows))
PY
