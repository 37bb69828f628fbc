"""Entropy decoding must not depend on where it runs.

The decoder recomputes the CDF indices from the hyper-latent; one differing index corrupts
everything after it. Encode with 2 threads, then recompute the symbols with 1 thread in this
process and in a fresh process, and compare them exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from compass_serve.codec import bitstream as bs
from compass_serve.codec.backbone import HyperpriorBackbone
from compass_serve.codec.coder import Codec
from compass_serve.imageio import resize, to_tensor
from tests.conftest import photo

REPO = Path(__file__).resolve().parents[1]


def decoded_symbols(codec: Codec, data: bytes) -> list[list[int]]:
    """Per layer: the y symbols the entropy decoder reads (indices recomputed from z)."""
    stream = bs.Bitstream.parse(data)
    model = codec.model
    out = []
    for k, (entry, payload) in enumerate(zip(stream.header.table, stream.payloads, strict=True)):
        backbone: HyperpriorBackbone = model.base.codec if k == 0 else model.enhancement.residual
        z_str, y_str = bs.unpack_strings(payload)
        size = (entry.height, entry.width)
        z_hat = backbone.entropy_bottleneck.decompress([z_str], backbone.hyper_sizes(size)[-1])
        scales, _ = backbone._entropy_params(z_hat, size, exact=True)
        indexes = backbone.gaussian_conditional.build_indexes(scales)
        sym = backbone.gaussian_conditional.decompress([y_str], indexes)
        out.append(sym.flatten().int().tolist())
    return out


def encoder_symbols(codec: Codec, img, widths: list[int]) -> list[list[int]]:
    """Per layer: the symbols the encoder wrote (closed loop, as `Compass.compress` does)."""
    model = codec.model
    sizes = codec.ladder(img, widths=widths)
    q = 2.0
    out, x_prev = [], None
    with torch.inference_mode():
        for k, (w, h) in enumerate(sizes):
            x = to_tensor(resize(img, w, h))
            if k:
                pred = model.enhancement.predict(x_prev, (h, w))
                x = x - pred
            backbone = model.base.codec if k == 0 else model.enhancement.residual
            y = backbone.g_a(x) * backbone.gain(q)
            z = backbone.h_a(y)
            z_hat = backbone.entropy_bottleneck.decompress(
                backbone.entropy_bottleneck.compress(z), z.shape[-2:])
            _, means = backbone._entropy_params(z_hat, (h, w), exact=True)
            out.append(torch.round(y - means).flatten().int().tolist())
            coded = backbone.compress(x, q)
            x_prev = coded.x_hat if k == 0 else pred + coded.x_hat
    return out


def digest(symbols: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(symbols).encode()).hexdigest()


def test_symbols_identical_across_threads_and_processes(tiny_store: Path) -> None:
    codec = Codec.load("tiny", tiny_store)
    img = photo(150, 101, seed=3)
    widths = [40, 75, 150]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = codec.encode(img, widths=widths, quality=2.0)
        written = encoder_symbols(codec, img, widths)
        torch.set_num_threads(1)
        here = decoded_symbols(codec, data)
    finally:
        torch.set_num_threads(before)
    assert here == written
    assert sum(len(s) for s in here) > 100

    stream_path = tiny_store / "determinism.cmp"
    stream_path.write_bytes(data)
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from compass_serve.codec.coder import Codec\n"
        "from tests.test_determinism import decoded_symbols, digest\n"
        f"codec = Codec.load('tiny', Path({str(tiny_store)!r}))\n"
        f"print(digest(decoded_symbols(codec, Path({str(stream_path)!r}).read_bytes())))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'service'}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300, check=True)
    assert res.stdout.strip().splitlines()[-1] == digest(written)
