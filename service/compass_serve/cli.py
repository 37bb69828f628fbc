"""`compass-serve` command line: codec (encode, decode, info, models), training (train, export,
eval), the service (serve) and its client (upload, get, fetch)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from compass_serve.allocator import retain_freed_memory
from compass_serve.client.errors import CompassError
from compass_serve.codec import bitstream as bs
from compass_serve.training.stages import PRECISIONS, STAGES

if TYPE_CHECKING:
    from compass_serve.client import Client


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from exc


def cmd_encode(args: argparse.Namespace) -> int:
    from compass_serve.codec.coder import Codec
    from compass_serve.imageio import load_rgb

    codec = Codec.load(args.model)
    image = load_rgb(args.input)
    data = codec.encode(image, widths=args.widths, scales=args.scales, quality=args.quality,
                        refine=args.refine_steps)
    Path(args.output).write_bytes(data)
    header = bs.parse_header(data)
    layers = " -> ".join(f"{e.width}x{e.height}" for e in header.table)
    print(f"{args.output}: {len(data)} bytes, {layers}, quality {header.quality:g}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from compass_serve.codec.coder import Codec

    data = Path(args.input).read_bytes()
    header = bs.parse_header(data)
    # Without --model, the exact weights version the stream names (current or archived).
    codec = Codec.load(args.model) if args.model else Codec.load(header.model, weights_id=header.weights_id)
    out = codec.decode(data, width=args.width, layer=args.layer)
    out.image.save(args.output)
    print(f"{args.output}: {out.image.width}x{out.image.height}, {out.note}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    data = Path(args.input).read_bytes()
    stream = bs.Bitstream.parse(data, verify=True)
    h = stream.header
    if args.json:
        d = h.to_json()
        print(json.dumps({k: d[k] for k in ("width", "height", "quality", "model", "layers")}
                         | {"weights_id": d["weights_id"], "header_length": h.size}, indent=2))
        return 0
    print(f"{args.input}: {len(data)} bytes, {h.width}x{h.height}, model {h.model} "
          f"(weights {h.weights_id.hex()}), quality {h.quality:g}, header {h.size} bytes")
    print(f"{'layer':>5} {'size':>11} {'offset':>9} {'length':>9} {'share':>6}  crc32")
    for i, e in enumerate(h.table):
        print(f"{i:>5} {f'{e.width}x{e.height}':>11} {e.offset:>9} {e.length:>9} "
              f"{e.length / len(data):>6.1%}  {e.crc32:08x}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from compass_serve.codec.registry import PRESETS, list_models, preset_parameters

    if args.presets:
        counts = {name: preset_parameters(name) for name in PRESETS}
        if args.json:
            print(json.dumps(counts, indent=2))
            return 0
        print(f"{'preset':34} {'IC':>8} {'RC':>8} {'RC g_a':>8} {'RC g_s':>8} {'LIFF':>8} "
              f"{'filter':>8}  (M)")
        for name, c in counts.items():
            print(f"{name:34} " + " ".join(f"{c[k] / 1e6:8.2f}" for k in (
                "ic", "rc", "rc_analysis", "rc_synthesis", "liff", "post_filter")))
        return 0
    models = list_models(archived=args.all)
    if args.json:
        print(json.dumps([{"name": m.name, "preset": m.preset, "qualities": m.qualities,
                           "sha256": m.sha256, "weights_id": m.weights_id.hex(),
                           "archived": bool(m.manifest.get("archived")),
                           "file": m.path.name,
                           "encoder_file": m.encoder_path.name if m.encoder_path else None,
                           "training_stages": m.manifest.get("training", {}).get("stages")}
                          for m in models], indent=2))
        return 0
    if not models:
        print("no models in the model store")
        return 1
    for m in models:
        print(f"{m.name:10} preset={m.preset:6} qualities=1..{m.qualities} "
              f"sha256={m.sha256[:16]}... ({', '.join(p.name for p, _ in m.files)})"
              + (" [archived: decodes older streams]" if m.manifest.get("archived") else ""))
        # What `train --init-from` continues: `--minutes` counts each stage's minutes so far.
        stages = m.manifest.get("training", {}).get("stages") or {}
        if stages:
            print(f"{'':10} trained {sum(v['hours'] for v in stages.values()):.1f} h: " + ", ".join(
                f"{k} {v['hours']:.2f} h / {v['steps']} steps ({v['hours'] * 60:.0f} min)"
                for k, v in stages.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from compass_serve.training.train import TrainArgs, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for stage in args.stage:
        finished = train(TrainArgs(
            stage=stage, preset=args.preset, data=args.data, out=args.out, minutes=args.minutes,
            lr=args.lr, batch=args.batch, crop=args.crop, seed=args.seed, device=args.device,
            threads=args.threads, resume=not args.fresh, init_from=args.init_from,
            warmup_steps=args.warmup_steps, val_minutes=args.val_minutes,
            checkpoint_minutes=args.checkpoint_minutes, cycle_minutes=args.cycle_minutes,
            precision=args.precision,
        ))
        if not finished:  # stopped by a signal: later stages must not start
            logging.getLogger(__name__).warning("stopped during stage %s; saved, resumable", stage)
            return 130
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from compass_serve.codec.coder import Codec
    from compass_serve.evaluation.run import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    codec = Codec.load(args.model)
    res = evaluate(codec, Path(args.data), Path(args.out), qualities=args.qualities,
                   limit=args.limit, with_anchors=not args.no_anchors,
                   with_ablation=not args.no_ablation, with_tables=args.tables,
                   refine_steps=args.refine_steps)
    print((Path(args.out) / "results.md").read_text())
    if args.write_manifest:
        from compass_serve.codec.registry import update_manifest

        update_manifest(args.model, {"eval": {k: res[k] for k in (
            "data", "images", "machine", "refine_steps", "ladder_scales", "compass", "single_layer",
            "simulcast", "bd_rate", "timing") if k in res} | ({"ablation_bd_el_bits_liff_vs_bicubic":
                res["ablation"]["bd_el_bits_liff_vs_bicubic"]} if "ablation" in res else {})})
    return 0


def cmd_bd(args: argparse.Namespace) -> int:
    from compass_serve.evaluation.run import bd_points, summarize, top_layer

    qs = [f"{q:g}" for q in args.qualities] if args.qualities else None
    try:
        res = json.loads(Path(args.results).read_text())
        top = top_layer(res, qs)
        within = tuple(args.psnr) if args.psnr else None
        if within is not None and (len(within) != 2 or within[0] >= within[1]):
            raise ValueError(f"--psnr needs LOW,HIGH with LOW < HIGH, got {args.psnr}")
        table = summarize(res, qs, within)
        others = {path: top_layer(json.loads(Path(path).read_text())) for path in args.against}
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    for path, other in others.items():
        table[f"compass of {path}"] = bd_points(other, top, within)
    if args.published:
        from compass_serve.evaluation.published import PUBLISHED_PSNR, published_curve

        for name in PUBLISHED_PSNR:
            table[f"published {name}"] = bd_points(published_curve(name), top, within)
    print(f"BD-rate of {res['model']} ({res['weights_id']}), qualities {qs or list(res['compass'])}, "
          + (f"PSNR {within[0]:g}-{within[1]:g} dB, " if within else "")
          + "top layer, cumulative bits (negative = fewer bits):")
    for k, v in table.items():
        print(f"  {k:28} " + ("n/a" if v != v else f"{v:+.1f} %"))
    if args.published:
        from compass_serve.evaluation.published import published_vs_anchors

        print("Published curves (CompressAI, Kodak) against this eval's single-layer anchors, "
              "whole overlap (negative = the published codec needs fewer bits):")
        for name, row in published_vs_anchors(res).items():
            print(f"  {name:14} " + "  ".join(
                f"{a} " + ("n/a" if v != v else f"{v:+.1f} %") for a, v in row.items()))
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from compass_serve.evaluation.curve import learning_curve

    rows = learning_curve(Path(args.run), Path(args.data), Path(args.out), args.rate, args.limit,
                          every=args.every)
    for r in rows:
        print(f"{r['stage']:9} step {r['step']:6d} {r['hours']:6.2f} h  "
              f"PSNR@{args.rate:g}bpp {r['psnr_at_rate']:.2f} dB")
    print(f"plot: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from compass_serve.training.export import export_run
    from compass_serve.training.train import LOG_NAME

    log = Path(args.log) if args.log else Path(args.run) / LOG_NAME
    if args.log and not log.exists():  # the run's own log may be absent; a named one may not
        raise FileNotFoundError(f"no such log: {log}")
    info = export_run(Path(args.run), args.name, weights=args.weights, log=log)
    print(f"exported {info.path} (sha256 {info.sha256[:16]}...)")
    if args.plot:
        import csv

        from compass_serve.evaluation.curve import CURVE_STAGES
        from compass_serve.evaluation.plots import learning_curve

        with log.open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["stage"] in CURVE_STAGES]
        learning_curve(rows, Path(args.plot), f"{args.name}: held-out PSNR while training")
        print(f"learning curve: {args.plot}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from compass_serve.server import Settings, create_app

    # Flags override the environment (COMPASS_HOST, COMPASS_PORT, COMPASS_DATA_DIR), which
    # overrides the built-in defaults (127.0.0.1:8000, ./data).
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                    ("data_dir", args.data_dir)) if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from compass_serve.server import Settings
    from compass_serve.server.worker_main import run_worker

    # A worker only makes sense on the Celery queue, whatever COMPASS_QUEUE says.
    settings = Settings(queue="celery")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_worker(settings, concurrency=args.concurrency, pool=args.pool, name=args.name)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from compass_serve.server import Settings
    from compass_serve.server.db import Database

    db = Database(Settings().db_url)
    print(f"database schema at revision {db.migrate()}")
    db.close()
    return 0


def _client(args: argparse.Namespace) -> Client:
    from compass_serve.client import Client

    return Client(args.server, api_key=args.api_key)


def cmd_upload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.upload(Path(args.input), widths=args.widths, scales=args.scales,
                        quality=args.quality, wait=args.wait)
    print(info.id)
    if args.wait:
        layers = " -> ".join(f"{la.width}x{la.height}" for la in info.layers)
        print(f"{info.status}: {layers}, {info.size} bytes", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as c:
        img = c.get(args.id, width=args.width, format=args.format)
    img.save(args.output)
    print(f"{args.output}: {img.width}x{img.height} (decoded by the server)")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with _client(args) as c:
        man = c.manifest(args.id)
        target = man.bytes_for_width(args.width) if man.ready else None
        with tqdm(total=target, unit="B", unit_scale=True, desc="fetch", file=sys.stderr) as bar:
            c.on_bytes = bar.update
            if args.progressive:
                widths = [la.width for la in man.layers if la.width < args.width] + [args.width]
                for img in c.progressive(args.id, widths):
                    bar.set_postfix(width=img.width, refresh=True)
            else:
                img = c.fetch(args.id, args.width)
    img.save(args.output)
    print(f"{args.output}: {img.width}x{img.height} (decoded locally from {target} bytes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compass-serve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="encode an image into a multi-layer .cmp stream")
    e.add_argument("input")
    e.add_argument("output")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--scales", type=_floats, help="layer scales, e.g. 0.25,0.5,1")
    g.add_argument("--widths", type=_ints, help="layer widths in pixels, e.g. 192,384,768")
    e.add_argument("--quality", type=float, default=None, help="1..Q, fractional allowed")
    e.add_argument("--refine-steps", type=int, default=0, metavar="N",
                   help="optimise each layer's latent for N steps: fewer bytes, slower encode")
    e.add_argument("--model", default="lite")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="decode a .cmp stream (or any prefix of one) to an image")
    d.add_argument("input")
    d.add_argument("-o", "--output", required=True)
    g = d.add_mutually_exclusive_group()
    g.add_argument("--width", type=int, help="output width (any; aspect kept)")
    g.add_argument("--layer", type=int, help="decode this coded layer (0 = base)")
    d.add_argument("--model", default=None, help="default: the model named in the stream")
    d.set_defaults(func=cmd_decode)

    i = sub.add_parser("info", help="print a stream's layer table")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("models", help="list the shipped models")
    m.add_argument("--json", action="store_true")
    m.add_argument("--all", action="store_true", help="also list archived weight versions")
    m.add_argument("--presets", action="store_true",
                   help="list the presets' parameter counts (IC, RC and its transforms, LIFF)")
    m.set_defaults(func=cmd_models)

    t = sub.add_parser("train", help="train a model (staged, resumable)")
    t.add_argument("--stage", nargs="+", default=["backbone", "liff", "joint"],
                   choices=STAGES)
    t.add_argument("--preset", default="lite")
    t.add_argument("--data", default="../shared/data/train")
    t.add_argument("--out", default="runs/lite")
    t.add_argument("--minutes", type=float, default=30.0, help="time budget per stage")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--crop", type=int, default=192)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    t.add_argument("--warmup-steps", type=int, default=200,
                   help="linear learning-rate warm-up (from 0, or from a resumed optimizer's rate)")
    t.add_argument("--val-minutes", type=float, default=5.0,
                   help="held-out validation (and a learning-curve snapshot) every N minutes")
    t.add_argument("--checkpoint-minutes", type=float, default=5.0)
    t.add_argument("--cycle-minutes", type=float, default=0.0,
                   help="the learning-rate schedule (hold, then cosine to 5%%) spans only the "
                        "budget's last N minutes: a new cycle on a stage that already has hours, "
                        "e.g. after --init-from widened the model (0: the whole budget)")
    t.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: autocast the transforms' forward passes to bfloat16 (weights, "
                        "optimizer, entropy models and loss stay float32); ~1.7x the steps per "
                        "hour on CPUs with AVX512-BF16 and on GPUs")
    t.add_argument("--init-from", default=None, metavar="MODEL|CHECKPOINT",
                   help="when the run directory is empty, start from this shipped model, or from "
                        "another run's .safetensors checkpoint with its record and optimizer state")
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="rate-distortion evaluation (Kodak protocol)")
    ev.add_argument("--data", default="../shared/data/kodak")
    ev.add_argument("--out", default="runs/eval")
    ev.add_argument("--model", default="lite")
    ev.add_argument("--qualities", type=_floats, default=None)
    ev.add_argument("--limit", type=int, default=None, help="first N images only")
    ev.add_argument("--no-anchors", action="store_true", help="skip JPEG/WebP/AVIF")
    ev.add_argument("--no-ablation", action="store_true", help="skip LIFF vs bicubic")
    ev.add_argument("--tables", action="store_true", help="also the arbitrary-scale tables")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--refine-steps", type=int, default=0, metavar="N",
                    help="encoder latent refinement for every COMPASS and backbone coding")
    ev.add_argument("--write-manifest", action="store_true",
                    help="store the figures in the model's manifest")
    ev.set_defaults(func=cmd_eval)

    bd = sub.add_parser("bd", help="BD-rates of a stored eval result, over chosen qualities")
    bd.add_argument("results", help="an eval's results.json")
    bd.add_argument("--qualities", type=_floats, default=None,
                    help="e.g. 3,4,5,6: compare on the rate range another model covers")
    bd.add_argument("--against", action="append", default=[], metavar="RESULTS",
                    help="another eval's results.json: its COMPASS top layer as one more anchor")
    bd.add_argument("--psnr", type=_floats, default=None, metavar="LOW,HIGH",
                    help="integrate over this PSNR interval only (within the curves' overlap): "
                         "compares models whose rate points moved over the same PSNRs")
    bd.add_argument("--published", action="store_true",
                    help="also CompressAI's published Kodak curves (mbt2018-mean, BPG, VTM, "
                         "WebP): against COMPASS, and against this eval's anchors")
    bd.set_defaults(func=cmd_bd)

    cu = sub.add_parser("curve", help="learning curve: Kodak PSNR at a fixed rate vs hours")
    cu.add_argument("--run", default="runs/lite")
    cu.add_argument("--data", default="../shared/data/kodak")
    cu.add_argument("--out", default="docs/learning_curve.png")
    cu.add_argument("--rate", type=float, default=0.5, help="bits per pixel")
    cu.add_argument("--limit", type=int, default=6, help="first N images")
    cu.add_argument("--every", type=int, default=1,
                    help="measure every N-th snapshot of each stage (and each stage's last)")
    cu.set_defaults(func=cmd_curve)

    ex = sub.add_parser("export", help="copy a training run's weights into model_store/")
    ex.add_argument("--run", default="runs/lite")
    ex.add_argument("--name", default="lite")
    ex.add_argument("--weights", default="last", choices=["last", "best"])
    ex.add_argument("--plot", default=None, help="also plot the run's learning curve (PNG)")
    ex.add_argument("--log", default=None,
                    help="validation log to record and plot (default: the run's log.csv), e.g. a "
                         "committed log the run's rows were appended to")
    ex.set_defaults(func=cmd_export)

    sv = sub.add_parser("serve", help="run the HTTP service (settings: COMPASS_* environment variables)")
    sv.add_argument("--host", default=None, help="default: COMPASS_HOST or 127.0.0.1")
    sv.add_argument("--port", type=int, default=None, help="default: COMPASS_PORT or 8000")
    sv.add_argument("--data-dir", default=None,
                    help="all state lives here; default: COMPASS_DATA_DIR or ./data")
    sv.set_defaults(func=cmd_serve)

    wk = sub.add_parser("worker", help="run a Celery encode/decode worker (settings: COMPASS_* variables)")
    wk.add_argument("--concurrency", type=int, default=1, help="jobs at once (processes); default 1")
    wk.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                    help="prefork (default): a dying job process is noticed and its job requeued")
    wk.add_argument("--name", default=None, help="worker name; default compass@<hostname>")
    wk.set_defaults(func=cmd_worker)

    mg = sub.add_parser("migrate", help="create or upgrade the database schema (COMPASS_DATABASE_URL)")
    mg.set_defaults(func=cmd_migrate)

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server", default=None, help="default: COMPASS_URL or http://127.0.0.1:8000")
        sp.add_argument("--api-key", default=None, help="default: COMPASS_API_KEY")

    up = sub.add_parser("upload", help="upload an image to a server; prints its id")
    up.add_argument("input")
    g = up.add_mutually_exclusive_group()
    g.add_argument("--scales", type=_floats)
    g.add_argument("--widths", type=_ints)
    up.add_argument("--quality", type=float, default=None)
    up.add_argument("--wait", action="store_true", help="wait until it is encoded")
    client_args(up)
    up.set_defaults(func=cmd_upload)

    gt = sub.add_parser("get", help="download an image decoded by the server")
    gt.add_argument("id")
    gt.add_argument("--width", type=int, default=None)
    gt.add_argument("--format", default=None, choices=["png", "jpeg", "webp", "avif"])
    gt.add_argument("-o", "--output", required=True)
    client_args(gt)
    gt.set_defaults(func=cmd_get)

    fe = sub.add_parser("fetch", help="fetch only the layers a width needs and decode locally")
    fe.add_argument("id")
    fe.add_argument("--width", type=int, required=True)
    fe.add_argument("-o", "--output", required=True)
    fe.add_argument("--progressive", action="store_true",
                    help="layer by layer, each step fetching only the new bytes")
    client_args(fe)
    fe.set_defaults(func=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        retain_freed_memory()  # COMPASS_HEAP_RETAIN_MIB; see compass_serve.allocator
        return args.func(args)
    except (ValueError, LookupError, OSError, CompassError) as exc:
        # Every user-facing failure (bad image, bad stream, wrong model, bad ladder) is a
        # ValueError/LookupError subclass with a readable message: print it, no traceback.
        print(f"compass-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
