"""The `compass-serve` command line, run as a real process on real files."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import photo

REPO = Path(__file__).resolve().parents[1]


def cli(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COMPASS_MODEL_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "compass_serve.cli", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300, check=check)


def train_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(21):  # every 20th image is the held-out slice
        photo(72, 64, seed=i).save(data / f"{i:02d}.png")
    return data


def test_encode_info_decode_round_trip(tiny_store: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    photo(160, 100).save(src)
    cmp = tmp_path / "out.cmp"
    res = cli(tiny_store, "encode", str(src), str(cmp), "--widths", "40,80,160",
              "--quality", "2", "--model", "tiny")
    assert "40x25 -> 80x50 -> 160x100" in res.stdout

    info = json.loads(cli(tiny_store, "info", str(cmp), "--json").stdout)
    assert (info["width"], info["height"], info["model"], info["quality"]) == (160, 100, "tiny", 2)
    layers = info["layers"]
    assert [(la["width"], la["height"]) for la in layers] == [(40, 25), (80, 50), (160, 100)]
    data = cmp.read_bytes()
    assert layers[-1]["offset"] + layers[-1]["length"] == len(data)
    for a, b in itertools.pairwise(layers):
        assert a["offset"] + a["length"] == b["offset"]
    assert layers[0]["offset"] < 128  # header stays small

    # Each layer decodes from its own prefix, written as a separate file.
    for k, layer in enumerate(layers):
        part = tmp_path / f"prefix{k}.cmp"
        part.write_bytes(data[: layer["offset"] + layer["length"]])
        out = tmp_path / f"layer{k}.png"
        res = cli(tiny_store, "decode", str(part), "-o", str(out))
        assert f"layer {k} of 3" in res.stdout
        assert Image.open(out).size == (layer["width"], layer["height"])

    out = tmp_path / "w123.png"
    cli(tiny_store, "decode", str(cmp), "-o", str(out), "--width", "123")
    assert Image.open(out).size == (123, 77)
    assert np.asarray(Image.open(out)).std() > 0

    text = cli(tiny_store, "info", str(cmp)).stdout
    assert "header" in text and "160x100" in text


def test_models_lists_the_store(tiny_store: Path) -> None:
    models = json.loads(cli(tiny_store, "models", "--json").stdout)
    names = {m["name"]: m for m in models}
    assert {"tiny", "tiny-other"} <= set(names)
    assert len(names["tiny"]["sha256"]) == 64 and names["tiny"]["qualities"] == 4
    assert (names["tiny"]["file"], names["tiny"]["encoder_file"]) == (
        "tiny.safetensors", "tiny.encoder.safetensors")
    text = cli(tiny_store, "models").stdout
    assert "(tiny.safetensors, tiny.encoder.safetensors)" in text


def test_models_shows_the_training_record_that_init_from_continues() -> None:
    """The shipped manifest's stage minutes are what `train --minutes` counts from."""
    from compass_serve.codec.registry import default_store

    store = default_store()
    shipped = json.loads((store / "lite.json").read_text())["training"]["stages"]
    listed = {m["name"]: m for m in json.loads(cli(store, "models", "--json").stdout)}
    assert listed["lite"]["training_stages"] == shipped
    text = cli(store, "models").stdout
    joint = shipped["joint"]
    assert f"joint {joint['hours']:.2f} h / {joint['steps']} steps ({joint['hours'] * 60:.0f} min)" \
        in text
    assert f"trained {sum(v['hours'] for v in shipped.values()):.1f} h" in text


def test_models_presets_counts_each_part(tiny_store: Path) -> None:
    from compass_serve.codec.registry import PRESETS

    counts = json.loads(cli(tiny_store, "models", "--presets", "--json").stdout)
    assert set(counts) == set(PRESETS)
    for c in counts.values():
        assert c["rc_analysis"] + c["rc_synthesis"] < c["rc"]
        assert min(v for k, v in c.items() if k != "post_filter") > 0
    wide, wider = counts["lite-wide-rc192-ga192-gs128"], counts["lite-wide-rc192-ga256-gs128"]
    # Widening the analysis transform grows the RC by exactly its analysis, nothing else.
    assert wider["rc_analysis"] > wide["rc_analysis"]
    assert wider["rc"] - wide["rc"] == wider["rc_analysis"] - wide["rc_analysis"]
    assert (wider["ic"], wider["rc_synthesis"], wider["liff"]) == (
        wide["ic"], wide["rc_synthesis"], wide["liff"])
    # The post-filter adds its three convolutions (7 -> 32 -> 32 -> 3, 3x3) and nothing else.
    filtered = counts["lite-wide-rc192-ga192-gs128-pf32"]
    assert filtered == {**wide, "post_filter": 7 * 32 * 9 + 32 + 32 * 32 * 9 + 32 + 32 * 3 * 9 + 3}
    assert wide["post_filter"] == 0
    text = cli(tiny_store, "models", "--presets").stdout
    assert all(name in text for name in PRESETS)


def test_errors_are_one_line_not_tracebacks(tiny_store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    res = cli(tiny_store, "encode", str(bad), str(tmp_path / "x.cmp"), "--model", "tiny",
              check=False)
    assert res.returncode == 2 and "error:" in res.stderr and "Traceback" not in res.stderr
    res = cli(tiny_store, "encode", str(bad), str(tmp_path / "x.cmp"), "--model", "nope",
              check=False)
    assert res.returncode == 2 and "not in the model store" in res.stderr
    junk = tmp_path / "junk.cmp"
    junk.write_bytes(b"CMPS" + bytes(100))
    res = cli(tiny_store, "decode", str(junk), "-o", str(tmp_path / "o.png"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_train_runs_a_stage_in_bfloat16_and_rejects_other_precisions(
    tiny_store: Path, tmp_path: Path
) -> None:
    data = train_data(tmp_path)
    out = tmp_path / "run"
    common = ["train", "--stage", "backbone", "--preset", "tiny", "--data", str(data), "--out",
              str(out), "--minutes", "0.02", "--crop", "48", "--batch", "2", "--threads", "1"]
    cli(tiny_store, *common, "--precision", "bf16")
    progress = json.loads((out / "progress.json").read_text())
    assert progress["backbone"]["steps"] > 0 and progress["preset"] == "tiny"
    assert "val_loss" in (out / "log.csv").read_text().splitlines()[0]
    res = cli(tiny_store, *common, "--precision", "fp16", check=False)
    assert res.returncode == 2 and "invalid choice: 'fp16'" in res.stderr


def test_sigint_stops_training_saves_the_stage_and_starts_no_later_one(
    tiny_store: Path, tmp_path: Path
) -> None:
    data = train_data(tmp_path)
    out = tmp_path / "run"
    env = {**os.environ, "COMPASS_MODEL_STORE": str(tiny_store)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "compass_serve.cli", "train", "--stage", "residual", "joint",
         "--preset", "tiny", "--data", str(data), "--out", str(out), "--minutes", "30",
         "--crop", "48", "--batch", "2", "--threads", "1"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # log.csv is opened once the signal handlers are in place, just before the first step.
        deadline = time.monotonic() + 120
        while not (out / "log.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.2)
        time.sleep(1.0)  # a few steps
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped during stage residual" in stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["residual"]["steps"] > 0
    assert progress.get("joint", {}).get("steps", 0) == 0  # the next stage never started
    assert (out / "last.safetensors").exists() and (out / "optimizer-residual.pt").exists()
