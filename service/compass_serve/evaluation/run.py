"""`compass-serve eval`: the paper's protocol on a folder of images (Kodak).

Rate is cumulative: all bytes of the `.cmp` file up to layer k (header included) over layer k's
pixels; distortion is layer k's RGB PSNR (8-bit) against the ladder's Pillow-bicubic downscale.
Curves average bpp and PSNR over the images at each quality setting.
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from compass_serve.codec import bitstream as bs
from compass_serve.codec.coder import Codec
from compass_serve.evaluation import anchors
from compass_serve.evaluation.bd import bd_rate
from compass_serve.imageio import load_rgb, resize, to_image
from compass_serve.training.data import list_images

log = logging.getLogger(__name__)
LADDER = (0.25, 0.5, 1.0)
TWO_LAYER_FACTORS = (1.2, 1.6, 2.0, 2.4, 2.8)
THREE_LAYER_FACTORS = (2.4, 2.8, 3.2, 3.6, 4.0)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


@dataclass
class Ladder:
    sizes: list[tuple[int, int]]
    refs: list[Image.Image]


def ladder_for(img: Image.Image, widths: list[int]) -> Ladder:
    sizes = [(w, max(1, round(img.height * w / img.width))) for w in widths]
    return Ladder(sizes, [img if s == img.size else resize(img, *s) for s in sizes])


def code_compass(
    codec: Codec, img: Image.Image, lad: Ladder, q: float, refine_steps: int = 0
) -> list[tuple[float, float]]:
    """[(cumulative bpp, PSNR)] per layer of one COMPASS stream."""
    data = codec.encode(img, widths=[w for w, _ in lad.sizes], quality=q, refine=refine_steps)
    stream = bs.Bitstream.parse(data)
    recons = codec.decode_layers(stream)
    out = []
    for k, (entry, x) in enumerate(zip(stream.header.table, recons, strict=True)):
        bits = stream.header.table.prefix_length(k) * 8
        out.append((bits / (entry.width * entry.height), psnr(to_image(x), lad.refs[k])))
    return out


def code_single(codec: Codec, ref: Image.Image, q: float, refine_steps: int = 0) -> tuple[int, float]:
    """The backbone alone on one image (a one-layer stream): (bytes, PSNR)."""
    data = codec.encode(ref, widths=[ref.width], quality=q, refine=refine_steps)
    return len(data), psnr(codec.decode(data).image, ref)


def mean_curve(rows: list[list[tuple[float, float]]]) -> list[dict[str, float]]:
    arr = np.asarray(rows)  # [images, layers, 2]
    return [{"bpp": float(b), "psnr": float(p)} for b, p in arr.mean(0)]


class Evaluation:
    def __init__(self, codec: Codec, images: list[Path], out: Path, qualities: list[float],
                 refine_steps: int = 0) -> None:
        self.codec = codec
        # Encoder effort for every COMPASS and backbone coding alike, so comparisons stay fair.
        self.refine_steps = refine_steps
        self.paths = images
        self.out = out
        self.qualities = qualities
        self.images = [load_rgb(p) for p in images]
        self._single: dict[tuple[int, float], tuple[int, float]] = {}

    def single(self, i: int, q: float) -> tuple[int, float]:
        """Backbone coding of the whole image i (bytes, PSNR); the ladder and every scale table
        need the same figure, so it is coded once."""
        if (i, q) not in self._single:
            self._single[i, q] = code_single(self.codec, self.images[i], q, self.refine_steps)
        return self._single[i, q]

    def widths(self, img: Image.Image, scales: tuple[float, ...]) -> list[int]:
        return [max(1, round(img.width * s)) for s in scales]

    # -- 1, 2: COMPASS on the default ladder; the backbone's single-layer and simulcast ----------
    def ladder(self) -> dict:
        res: dict = {"compass": {}, "single_layer": {}, "simulcast": {}}
        for q in self.qualities:
            comp, single, simul = [], [], []
            for i, img in enumerate(tqdm(self.images, desc=f"ladder q={q:g}", leave=False)):
                lad = ladder_for(img, self.widths(img, LADDER))
                comp.append(code_compass(self.codec, img, lad, q, self.refine_steps))
                n, p = self.single(i, q)
                single.append([(n * 8 / (img.width * img.height), p)])
                acc, layers = 0, []
                for (w, h), ref in zip(lad.sizes, lad.refs, strict=True):
                    n, p = (self.single(i, q) if (w, h) == img.size
                            else code_single(self.codec, ref, q, self.refine_steps))
                    acc += n
                    layers.append((acc * 8 / (w * h), p))
                simul.append(layers)
            key = f"{q:g}"
            res["compass"][key] = mean_curve(comp)
            res["single_layer"][key] = mean_curve(single)[0]
            res["simulcast"][key] = mean_curve(simul)
        return res

    # -- 3: Pillow anchors --------------------------------------------------------------------------
    @property
    def anchor_effort(self) -> str:
        """A refining COMPASS encoder is compared with the anchors' slowest settings."""
        return "max" if self.refine_steps else "default"

    def anchors(self) -> dict:
        res: dict = {}
        for name in anchors.available():
            single, simul = [], []
            for aq in tqdm(anchors.QUALITIES[name], desc=name, leave=False):
                s_rows, m_rows = [], []
                for img in self.images:
                    lad = ladder_for(img, self.widths(img, LADDER))
                    acc, layers = 0, []
                    for (w, h), ref in zip(lad.sizes, lad.refs, strict=True):
                        n, dec = anchors.code(ref, name, aq, self.anchor_effort)
                        acc += n
                        layers.append((acc * 8 / (w * h), psnr(dec, ref)))
                    n, dec = anchors.code(img, name, aq, self.anchor_effort)
                    s_rows.append([(n * 8 / (img.width * img.height), psnr(dec, img))])
                    m_rows.append(layers)
                single.append({"quality": aq, **mean_curve(s_rows)[0]})
                simul.append({"quality": aq, "layers": mean_curve(m_rows)})
            res[name] = {"single": single, "simulcast": simul}
        return res

    # -- 5: LIFF against bicubic prediction with the same residual codec ----------------------------
    def ablation(self) -> dict:
        enh = self.codec.model.enhancement
        res = {}
        # The predictor question alone: the post-filter (trained on LIFF's predictions) is off for
        # both predictors, and back on once both curves are measured.
        post_filter, enh.post_filter = enh.post_filter, None
        try:
            for predictor in ("liff", "bicubic"):
                enh.predictor = predictor
                res[predictor] = self._el_curve(predictor)
        finally:
            enh.predictor = self.codec.model.cfg.predictor
            enh.post_filter = post_filter
        res["bd_el_bits_liff_vs_bicubic"] = bd_rate(
            [p["bpp"] for p in res["bicubic"]], [p["psnr"] for p in res["bicubic"]],
            [p["bpp"] for p in res["liff"]], [p["psnr"] for p in res["liff"]])
        return res

    def _el_curve(self, predictor: str) -> list[dict]:
        """Enhancement-layer bits against top-layer PSNR, per quality, with the predictor set."""
        curve = []
        for q in self.qualities:
            rows = []
            for img in tqdm(self.images, desc=f"ablation {predictor} q={q:g}", leave=False):
                lad = ladder_for(img, self.widths(img, LADDER))
                layers = code_compass(self.codec, img, lad, q, self.refine_steps)
                w, h = lad.sizes[-1]
                w0, h0 = lad.sizes[0]
                base_bits = layers[0][0] * w0 * h0
                el_bpp = (layers[-1][0] * w * h - base_bits) / (w * h)
                rows.append([(el_bpp, layers[-1][1])])
            curve.append(mean_curve(rows)[0])
        return curve

    # -- 6: arbitrary-scale tables ------------------------------------------------------------------
    def scale_tables(self, single: dict) -> dict:
        res: dict = {}
        chains = [("two", f, lambda f: (1 / f, 1.0)) for f in TWO_LAYER_FACTORS] + [
            ("three", f, lambda f: (1 / f, 2 / f, 1.0)) for f in THREE_LAYER_FACTORS]
        for kind, f, scales_of in tqdm(chains, desc="scale tables", leave=False):
            comp, simul = [], []
            for q in self.qualities:
                c_rows, s_rows = [], []
                for i, img in enumerate(self.images):
                    lad = ladder_for(img, self.widths(img, scales_of(f)))
                    c_rows.append(code_compass(self.codec, img, lad, q, self.refine_steps)[-1:])
                    acc = sum(code_single(self.codec, ref, q, self.refine_steps)[0]
                              for ref in lad.refs[:-1])
                    n, p = self.single(i, q)
                    s_rows.append([((acc + n) * 8 / (img.width * img.height), p)])
                comp.append(mean_curve(c_rows)[0])
                simul.append(mean_curve(s_rows)[0])
            sl = [single[f"{q:g}"] for q in self.qualities]
            res[f"{kind}-layer {f:g}x"] = {
                "compass": comp, "simulcast": simul,
                "bd_vs_simulcast": bd_points(simul, comp), "bd_vs_single_layer": bd_points(sl, comp),
            }
        return res

    # -- 7: timing and memory -----------------------------------------------------------------------
    def timing(self, n_images: int = 4, repeats: int = 3) -> dict:
        """Per image, the median of `repeats` decodes of each layer prefix (a shared VM's
        momentary CPU steal then moves one run, not the figure), averaged over the images."""
        enc, dec = [], []
        for img in self.images[:n_images]:
            widths = self.widths(img, LADDER)
            t = time.perf_counter()
            data = self.codec.encode(img, widths=widths, refine=self.refine_steps)
            enc.append(time.perf_counter() - t)
            table = bs.parse_header(data).table
            cum = []
            for k in range(len(table)):
                runs = []
                for _ in range(repeats):
                    t = time.perf_counter()
                    self.codec.decode(data[: table.prefix_length(k)])
                    runs.append(time.perf_counter() - t)
                cum.append(float(np.median(runs)))
            dec.append(cum)
        cum = np.asarray(dec).mean(0)
        return {
            "images": min(n_images, len(self.images)),
            "decode_repeats": repeats,
            "encode_s_all_layers": float(np.mean(enc)),
            "decode_s_up_to_layer": [float(c) for c in cum],
            "decode_s_per_layer": [float(c) for c in np.diff(np.concatenate([[0.0], cum]))],
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def bd_points(anchor: list[dict], test: list[dict],
              within: tuple[float, float] | None = None) -> float:
    """`bd_rate` of two curves given as points ({"bpp", "psnr"}, e.g. eval results)."""
    return bd_rate([p["bpp"] for p in anchor], [p["psnr"] for p in anchor],
                   [p["bpp"] for p in test], [p["psnr"] for p in test], within)


def top_layer(res: dict, qualities: Sequence[str] | None = None) -> list[dict]:
    """COMPASS's top-layer points (cumulative bits) of an eval result, at `qualities` (all)."""
    qs = list(qualities or res["compass"])
    missing = [q for q in qs if q not in res["compass"]]
    if missing:
        raise KeyError(f"qualities {missing} are not in the result (it has {list(res['compass'])})")
    return [res["compass"][q][-1] for q in qs]


def summarize(res: dict, qualities: Sequence[str] | None = None,
              within: tuple[float, float] | None = None) -> dict:
    """BD-rates of COMPASS's top layer against every anchor on the default ladder, over
    `qualities` (default: all that were evaluated; a subset compares models on a common range)
    and, with `within`, over that PSNR interval only (see `bd_rate`)."""
    qs = list(qualities or res["compass"])
    top = top_layer(res, qs)
    out = {
        "single_layer": bd_points([res["single_layer"][q] for q in qs], top, within),
        "simulcast": bd_points([res["simulcast"][q][-1] for q in qs], top, within),
    }
    for name, a in res.get("anchors", {}).items():
        out[f"{name}_single"] = bd_points(a["single"], top, within)
        out[f"{name}_simulcast"] = bd_points([s["layers"][-1] for s in a["simulcast"]], top, within)
    return out


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def evaluate(
    codec: Codec, data: Path, out: Path, *, qualities: list[float] | None = None,
    limit: int | None = None, with_anchors: bool = True, with_ablation: bool = True,
    with_tables: bool = False, refine_steps: int = 0,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = list_images(data)[: limit or None]
    qs = qualities or [float(q) for q in range(1, codec.qualities + 1)]
    ev = Evaluation(codec, paths, out, qs, refine_steps)
    t0 = time.time()
    res: dict = {"model": codec.name, "weights_id": codec.weights_id.hex(), "data": str(data),
                 "images": len(paths), "ladder_scales": list(LADDER), "qualities": qs,
                 "refine_steps": refine_steps,
                 "machine": machine(), "bd_interpolation": "cubic polynomial of log-rate in PSNR "
                 "(Bjontegaard VCEG-M33), over the common PSNR interval"}
    res.update(ev.ladder())
    if with_anchors:
        cache = out / "anchors.json"
        key = [p.name for p in paths]
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached.get("images") != key or cached.get("effort", "default") != ev.anchor_effort:
            cached = {"images": key, "effort": ev.anchor_effort, "anchors": ev.anchors()}
            cache.write_text(json.dumps(cached))
        res["anchors"] = cached["anchors"]
        res["anchor_effort"] = ev.anchor_effort
    res["bd_rate"] = summarize(res)
    if with_ablation:
        res["ablation"] = ev.ablation()
    if with_tables:
        res["scale_tables"] = ev.scale_tables(res["single_layer"])
    res["timing"] = ev.timing()
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    from compass_serve.evaluation.plots import rd_plot
    rd_plot(res, out / "rd.png")
    return res


def _f(x: float, nd: int = 2) -> str:
    return "n/a" if x != x else f"{x:+.{nd}f}" if nd == 1 else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    lines = [f"Model `{res['model']}` (weights {res['weights_id']}), {res['images']} images "
             f"from `{res['data']}`, ladder {res['ladder_scales']}; {res['machine']}"
             + (f"; encoder refinement {res['refine_steps']} steps per layer (COMPASS and backbone)"
                if res.get("refine_steps") else "")
             + ("; anchors at their slowest settings (JPEG optimize, WebP method 6)"
                if res.get("anchor_effort") == "max" else "") + ".", "",
             "| quality | " + " | ".join(f"layer {k} bpp (cum.) / PSNR" for k in
                                         range(len(res["ladder_scales"])))
             + " | single-layer bpp / PSNR | simulcast top bpp / PSNR |",
             "|---" * (len(res["ladder_scales"]) + 3) + "|"]
    for q, layers in res["compass"].items():
        cells = [f"{p['bpp']:.3f} / {p['psnr']:.2f}" for p in layers]
        s, m = res["single_layer"][q], res["simulcast"][q][-1]
        lines.append(f"| {q} | " + " | ".join(cells) + f" | {s['bpp']:.3f} / {s['psnr']:.2f} | "
                     f"{m['bpp']:.3f} / {m['psnr']:.2f} |")
    lines += ["", "BD-rate of COMPASS (top layer, cumulative bits) against each anchor "
              "(negative = COMPASS needs fewer bits):", "", "| anchor | BD-rate |", "|---|---|"]
    lines += [f"| {k} | {_f(v, 1)} % |" for k, v in res["bd_rate"].items()]
    if "ablation" in res:
        lines += ["", "Ablation, enhancement-layer bits at equal top-layer PSNR, LIFF vs bicubic "
                  f"prediction (same RC): {_f(res['ablation']['bd_el_bits_liff_vs_bicubic'], 1)} %"]
    if "scale_tables" in res:
        lines += ["", "| chain | BD vs simulcast | BD vs single-layer |", "|---|---|---|"]
        for k, v in res["scale_tables"].items():
            lines.append(f"| {k} | {_f(v['bd_vs_simulcast'], 1)} % | "
                         f"{_f(v['bd_vs_single_layer'], 1)} % |")
    t = res["timing"]
    lines += ["", f"Timing ({t['images']} images, {t['torch_threads']} threads): encode all "
              f"layers {t['encode_s_all_layers']:.2f} s; decode up to layer k (median of "
              f"{t.get('decode_repeats', 1)} per image): "
              + ", ".join(f"{x:.2f} s" for x in t["decode_s_up_to_layer"])
              + f"; peak RSS {t['peak_rss_mib']:.0f} MiB."]
    return "\n".join(lines) + "\n"
