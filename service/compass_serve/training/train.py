"""Staged, resumable COMPASS training (`compass-serve train`).

Stages (each runnable on its own, all sharing one run directory):
  backbone  the single-layer image codec (base layer, and the single-layer/simulcast anchor)
  liff      LIFF pre-training: predict layer k from the DECODED layer k-1 (base layer frozen)
  residual  the residual codec on LIFF's residuals (LIFF frozen); starts from the backbone
  joint     LIFF + RC together on the sum of the enhancement layers' RD losses (BL frozen)
  filter    the post-filter alone on the enhancement layers' decoded images (all else frozen,
            real rounding as a decoder does; its loss is the mean log-MSE, i.e. PSNR, so that
            every quality level counts alike)
Each stage has a time budget; the learning rate holds, then decays by cosine over the last
40% of it (a constant rate plateaus on this hardware). Variable rate: every sample draws one
of the model's quality levels and its lambda.

SIGINT or SIGTERM stops a run after its current step and saves it (weights, Adam state,
progress), so a stopped run resumes exactly where it stopped; a second signal aborts at once.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from compass_serve.codec.backbone import build_backbone, regrid_gains, widen
from compass_serve.codec.liff import Liff
from compass_serve.codec.model import Compass, CompassConfig
from compass_serve.codec.postfilter import PostFilter, deepen
from compass_serve.codec.registry import PRESETS, load_model, load_state, state_dict_for_save
from compass_serve.training.data import CropSampler, list_images, load_all, resize, split_holdout
from compass_serve.training.stages import PRECISIONS, STAGES

log = logging.getLogger(__name__)
# Every validation appends a row here, in the run directory; export and the curve read it.
LOG_NAME = "log.csv"
# The filter stage decodes a batch once (the frozen chain is most of a step's cost) and makes
# this many Adam steps on random FILTER_CROP-pixel windows of it: the filter sees 7 pixels of
# context, and a small fresh network needs many steps more than large crops.
FILTER_UPDATES = 4
FILTER_CROP = 96


@dataclass
class TrainArgs:
    stage: str
    preset: str = "lite"
    data: str = "../shared/data/train"
    out: str = "runs/lite"
    minutes: float = 30.0
    lr: float = 1e-3
    batch: int = 8
    crop: int = 192
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    checkpoint_minutes: float = 5.0
    val_minutes: float = 5.0
    # Linear warm-up (steps) when the optimizer starts anew (a fresh run, or --init-from shipped
    # weights: full-size Adam steps on fresh moments knock trained weights off course), and
    # when a resume raises the rate above the saved one (a new decay cycle).
    warmup_steps: int = 200
    resume: bool = True
    # Where to start when the run dir is empty: a model-store name, or another run's
    # .safetensors checkpoint (its progress.json and Adam state beside it carry on).
    init_from: str | None = None
    # > 0: the learning-rate schedule spans only the budget's last `cycle_minutes` (a new cycle
    # at full rate on a stage that already has hours; 0: the schedule spans the whole budget).
    cycle_minutes: float = 0.0
    # "bf16": forward passes autocast the transforms (convolutions, LIFF's MLP) to bfloat16;
    # weights, Adam, the entropy models and the loss stay float32 (`full_precision`). About
    # 1.7x the steps per hour on CPUs with AVX512-BF16 (benchmarks/train_step_breakdown.py
    # --precision bf16). Validation and every shipped weight are float32 either way.
    precision: str = "fp32"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bits(likelihoods: dict[str, torch.Tensor]) -> torch.Tensor:
    """Estimated bits per sample from the entropy models' likelihoods."""
    return sum(-torch.log2(lik).flatten(1).sum(1) for lik in likelihoods.values())


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b, reduction="none").flatten(1).mean(1)


def rd_loss(
    likelihoods: dict[str, torch.Tensor], x_hat: torch.Tensor, image: torch.Tensor,
    lam: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One coded layer's rate-distortion objective per sample: (bpp + lambda * 255^2 * MSE, bpp,
    MSE), the rate in bits per pixel of `image`, the distortion on the 8-bit scale."""
    bpp = bits(likelihoods) / (image.shape[-2] * image.shape[-1])
    mse = mse_per_sample(x_hat, image)
    return bpp + lam * 255**2 * mse, bpp, mse


def psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class Trainer:
    def __init__(self, args: TrainArgs) -> None:
        if args.stage not in STAGES:
            raise ValueError(f"unknown stage {args.stage!r}; choose from {', '.join(STAGES)}")
        if args.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {args.precision!r}; choose from "
                             f"{', '.join(PRECISIONS)}")
        self.args = args
        self.device = pick_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        np.random.seed(args.seed)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cfg = PRESETS[args.preset]
        self.model = Compass(self.cfg).to(self.device)
        self.lambdas = torch.tensor(self.cfg.lambdas, device=self.device)
        self.progress: dict[str, dict[str, float]] = {}
        self.source_run: Path | None = None  # the run an --init-from checkpoint came from
        self.stop_requested = False
        self._load()
        train_paths, held = split_holdout(list_images(args.data))
        self.sampler = CropSampler(load_all(train_paths, "train images"), args.seed + self.steps)
        self.val_images = [
            self._center(x) for x in load_all(held, "held-out images")
        ]
        self.params = self._stage_parameters()
        self.opt = torch.optim.Adam(self.params, lr=args.lr)
        eb = [p for n, p in self.model.named_parameters() if n.endswith("quantiles")]
        self.aux_opt = torch.optim.Adam(eb, lr=1e-3)
        # Adam state of this run (a resume) or of the run an --init-from checkpoint came from, so
        # continuing does not restart from zero moments. Warm-up ramps from the saved rate (0 for
        # a fresh optimizer): a resume that raises the rate, e.g. a new decay cycle, is ramped too.
        self.start_lr = 0.0
        name = f"optimizer-{args.stage}.pt"
        run = self.out if args.resume and (self.out / name).exists() else self.source_run
        if run is not None and (run / name).exists():
            st = torch.load(run / name, map_location=self.device, weights_only=True)
            self.opt.load_state_dict(st["opt"])
            self.aux_opt.load_state_dict(st["aux"])
            self.start_lr = float(self.opt.param_groups[0]["lr"])

    # -- state -----------------------------------------------------------------------------------
    @property
    def stage_state(self) -> dict[str, float]:
        return self.progress.setdefault(self.args.stage, {"steps": 0, "seconds": 0.0})

    @property
    def steps(self) -> int:
        return int(self.stage_state["steps"])

    def _load(self) -> None:
        weights = self.out / "last.safetensors"
        if self.args.resume and weights.exists():
            load_state(self.model, load_file(str(weights), device=str(self.device)))
            self.progress = json.loads((self.out / "progress.json").read_text())
            log.info("resumed from %s: %s", weights, self.progress)
        elif self.args.init_from:
            # Continue from shipped weights (a fresh machine has no run directory) and the training
            # record in their manifest, or from another run's checkpoint and its record.
            src = Path(self.args.init_from)
            if src.suffix == ".safetensors":
                self.source_run = src.parent
                state = load_file(str(src), device=str(self.device))
                record = json.loads((src.parent / "progress.json").read_text())
                self.progress = {k: {"steps": v["steps"], "seconds": v["seconds"]}
                                 for k, v in record.items() if k in STAGES}
                source = PRESETS[record.get("preset", self.args.preset)]
            else:
                model, info = load_model(self.args.init_from)
                state = {k: v.to(self.device) for k, v in model.state_dict().items()}
                stages = info.manifest.get("training", {}).get("stages", {})
                self.progress = {k: {"steps": v["steps"], "seconds": v["hours"] * 3600}
                                 for k, v in stages.items()}
                source = model.cfg
            if source.lambdas != self.cfg.lambdas:
                # Another rate ladder: gains regridded; Adam moments do not fit the new tables.
                state = regrid_gains(state, source.lambdas, self.cfg.lambdas)
                self.source_run = None
                log.info("gains regridded from %s to %s", source.lambdas, self.cfg.lambdas)
            if source.with_lambdas(self.cfg.lambdas).residual != self.cfg.residual:
                state = self._widen_residual(state, source)
                self.source_run = None
                log.info("residual codec widened from %s to %s", source.residual, self.cfg.residual)
            if (source.post_filter.channels and self.cfg.post_filter.channels
                    and source.post_filter.layers != self.cfg.post_filter.layers):
                state = self._deepen_filter(state, source)
                self.source_run = None
                log.info("post-filter deepened from %s to %s", source.post_filter,
                         self.cfg.post_filter)
            fresh = {k: v for k, v in self.model.state_dict().items()
                     if k.startswith("enhancement.post_filter.") and k not in state}
            if fresh:
                # A post-filter the source lacks starts as designed: the identity.
                state = {**state, **fresh}
                self.source_run = None
                log.info("post-filter added (identity at first)")
            load_state(self.model, state)
            self.progress["residual_init"] = True
            log.info("initialised from %s: %s", self.args.init_from, self.progress)
        if self.args.stage == "liff" and "liff" not in self.progress:
            # LIFF is untrained before its own stage: start it from its designed initialisation.
            fresh = Liff(self.cfg.liff).to(self.device)
            self.model.enhancement.liff.load_state_dict(fresh.state_dict())
        if self.args.stage in ("residual", "joint") and not self.progress.get("residual_init"):
            # The RC starts from the trained backbone: both are transform codecs of the same shape.
            rc = self.model.enhancement.residual
            base = self.model.base.codec
            if rc.cfg == base.cfg:
                load_state(rc, base.state_dict())
                log.info("residual codec initialised from the backbone")
            self.progress["residual_init"] = True

    def _widen_residual(
        self, state: dict[str, torch.Tensor], source: CompassConfig
    ) -> dict[str, torch.Tensor]:
        """`state` (of config `source`, gains already on this ladder) with its residual codec
        widened to this preset's: the same codes to start with (`widen`)."""
        prefix = "enhancement.residual."
        narrow = build_backbone(source.with_lambdas(self.cfg.lambdas).residual).to(self.device)
        load_state(narrow, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        rc = self.model.enhancement.residual
        widen(narrow, rc)
        return {**{k: v for k, v in state.items() if not k.startswith(prefix)},
                **{prefix + k: v for k, v in rc.state_dict().items()}}

    def _deepen_filter(
        self, state: dict[str, torch.Tensor], source: CompassConfig
    ) -> dict[str, torch.Tensor]:
        """`state` (of config `source`) with its post-filter deepened to this preset's: the same
        function to start with (`deepen`)."""
        prefix = "enhancement.post_filter."
        pf = self.model.enhancement.post_filter
        assert pf is not None
        shallow = PostFilter(source.post_filter, len(self.cfg.lambdas)).to(self.device)
        load_state(shallow, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        deepen(shallow, pf)
        return {**{k: v for k, v in state.items() if not k.startswith(prefix)},
                **{prefix + k: v for k, v in pf.state_dict().items()}}

    def save(self, name: str = "last") -> None:
        self.model.update()
        self.progress["preset"] = self.args.preset  # type: ignore[assignment]
        save_file(state_dict_for_save(self.model), str(self.out / f"{name}.safetensors"))
        record = json.dumps(self.progress, indent=1)
        (self.out / "progress.json").write_text(record)
        if name != "last":
            # The training record of these weights: progress.json moves on with the run (resumes
            # read it), so an export of "best" would otherwise claim the run's later steps.
            (self.out / f"{name}.progress.json").write_text(record)
        torch.save({"opt": self.opt.state_dict(), "aux": self.aux_opt.state_dict()},
                   self.out / f"optimizer-{self.args.stage}.pt")

    def _stage_parameters(self) -> list[torch.nn.Parameter]:
        m = self.model
        train = {
            "backbone": [m.base],
            "liff": [m.enhancement.liff],
            "residual": [m.enhancement.residual],
            "joint": [m.enhancement.liff, m.enhancement.residual],
            "filter": [m.enhancement.post_filter],
        }[self.args.stage]
        if None in train:
            raise ValueError(f"preset {self.args.preset!r} has no post-filter to train")
        for p in m.parameters():
            p.requires_grad_(False)
        params = []
        for mod in train:
            assert mod is not None
            for n, p in mod.named_parameters():
                p.requires_grad_(True)
                if not n.endswith("quantiles"):
                    params.append(p)
        return params

    def _center(self, x: torch.Tensor, side: int = 256) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = min(side, h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        return x[None, :, y0 : y0 + s, x0 : x0 + s].float().div(255).to(self.device)

    def schedule_frac(self, seconds: float) -> float:
        """How far the learning-rate schedule is after `seconds` of this stage: through the whole
        budget, or with `cycle_minutes` through its last `cycle_minutes` only."""
        budget = self.args.minutes * 60
        cycle = self.args.cycle_minutes * 60
        if not 0 < cycle < budget:
            return seconds / budget
        return max(0.0, seconds - (budget - cycle)) / cycle

    def lr_at(self, frac: float, session_steps: int = 0) -> float:
        """Held, then cosine to 5% over the last 40% of the budget, reached by a linear warm-up."""
        if frac < 0.6:
            lr = self.args.lr
        else:
            t = min(1.0, (frac - 0.6) / 0.4)
            lr = self.args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))
        if self.args.warmup_steps > 0 and self.start_lr < lr:
            warm = min(1.0, (session_steps + 1) / self.args.warmup_steps)
            lr = self.start_lr + (lr - self.start_lr) * warm
        return lr

    # -- one step ----------------------------------------------------------------------------------
    def _chain(self, crop: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [resize(crop, s).clamp(0, 1) for s in sizes]

    def step(self) -> dict[str, float]:
        q = torch.randint(0, len(self.cfg.lambdas), (self.args.batch,), device=self.device)
        if self.args.stage == "filter":
            return self._filter_step(q)
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.args.precision == "bf16"):
            loss, bpp, mse = self._forward(q)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        aux = self.model.aux_loss()
        self.aux_opt.zero_grad(set_to_none=True)
        if aux.requires_grad:
            aux.backward()
            self.aux_opt.step()
        return {
            "loss": float(loss.detach()),
            "bpp": float(bpp.detach().mean()),
            "psnr": float(psnr(mse.detach()).mean()),
        }

    def _forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch through the stage's layers: (loss, bpp per sample, top layer's MSE)."""
        a = self.args
        m = self.model
        lam = self.lambdas[q]
        if a.stage == "backbone":
            x = self.sampler.batch(a.batch, a.crop).to(self.device)
            m.base.train()
            out = m.base(x, q)
            loss, bpp, mse = rd_loss(out["likelihoods"], out["x_hat"], x, lam)
            loss = loss.mean()
        else:
            crop = self.sampler.batch(a.batch, a.crop).to(self.device)
            images = self._chain(crop, self.sampler.chain(a.crop))
            m.base.eval()
            with torch.no_grad():
                lower = m.base(images[0], q)["x_hat"]
            loss = torch.zeros((), device=self.device)
            bpp = torch.zeros(a.batch, device=self.device)
            m.enhancement.train()
            for image in images[1:]:
                size = (image.shape[-2], image.shape[-1])
                if a.stage == "liff":
                    pred = m.enhancement.predict(lower, size)
                    mse = mse_per_sample(pred, image)
                    loss = loss + (lam * 255**2 * mse).mean()
                    lower = pred.detach()
                    continue
                if a.stage == "residual":
                    with torch.no_grad():
                        pred = m.enhancement.predict(lower, size)
                    out = m.enhancement.residual(image - pred, q)
                    x_hat = pred + out["x_hat"]
                else:
                    res = m.enhancement(lower, image, q)
                    out, x_hat = res, res["x_hat"]
                layer_loss, layer_bpp, mse = rd_loss(out["likelihoods"], x_hat, image, lam)
                loss = loss + layer_loss.mean()
                bpp = bpp + layer_bpp.detach()
                lower = x_hat
        return loss, bpp, mse

    def _filter_step(self, q: torch.Tensor) -> dict[str, float]:
        """The filter stage: a batch's chain decoded as a decoder would (eval mode: rounding, not
        noise), then `FILTER_UPDATES` steps of the post-filter alone on random windows of each
        enhancement layer. The loss is the mean log-MSE, so that a level's PSNR gain counts the
        same at every rate (a plain MSE would serve the lowest rates)."""
        a, m = self.args, self.model
        pf = m.enhancement.post_filter
        assert pf is not None
        crop = self.sampler.batch(a.batch, a.crop).to(self.device)
        images = self._chain(crop, self.sampler.chain(a.crop))
        m.eval()
        with torch.no_grad():
            outs = m(images, q)[1:]  # the chain as a decoder runs it
        layers = [(o["x_hat"], o["prediction"], image) for o, image in zip(outs, images[1:],
                                                                             strict=True)]
        bpp = sum(bits(o["likelihoods"]) / (image.shape[-2] * image.shape[-1])
                  for o, image in zip(outs, images[1:], strict=True))
        pf.train()
        for _ in range(FILTER_UPDATES):
            loss = torch.zeros((), device=self.device)
            for x_hat, pred, image in layers:
                h, w = image.shape[-2:]
                r0 = random.randint(0, max(0, h - FILTER_CROP))
                c0 = random.randint(0, max(0, w - FILTER_CROP))
                win = (..., slice(r0, r0 + FILTER_CROP), slice(c0, c0 + FILTER_CROP))
                mse = mse_per_sample(pf(x_hat[win], pred[win], q).float(), image[win])
                loss = loss + torch.log10(mse.clamp_min(1e-10)).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        return {"loss": float(loss.detach()), "bpp": float(bpp.mean()),
                "psnr": float(psnr(mse.detach()).mean())}

    # -- validation (held-out slice of the training folder; never Kodak) ---------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        m = self.model.eval()
        res: dict[str, float] = {}
        total = 0.0
        for qi, lam in enumerate(self.cfg.lambdas):
            q = torch.tensor([qi], device=self.device)
            bpps, psnrs = [], []
            for x in self.val_images:
                s = x.shape[-1]
                if self.args.stage == "backbone":
                    out = m.base(x, q)
                    b = bits(out["likelihoods"]) / (s * s)
                    mse = mse_per_sample(out["x_hat"].clamp(0, 1), x)
                else:
                    chain = self._chain(x, [(s // 4, s // 4), (s // 2, s // 2), (s, s)])
                    outs = m(chain, q)
                    b = sum(bits(o["likelihoods"]) for o in outs) / (s * s)
                    top = outs[-1]
                    shown = m.enhancement.show(top["x_hat"], top["prediction"], q)
                    mse = mse_per_sample(shown.clamp(0, 1), x)
                bpps.append(float(b))
                psnrs.append(float(psnr(mse)))
            res[f"q{qi + 1}_bpp"] = float(np.mean(bpps))
            res[f"q{qi + 1}_psnr"] = float(np.mean(psnrs))
            total += res[f"q{qi + 1}_bpp"] + lam * 255**2 * float(
                np.mean([10 ** (-p / 10) for p in psnrs])
            )
        res["val_loss"] = total / len(self.cfg.lambdas)
        return res

    # -- loop --------------------------------------------------------------------------------------
    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask the loop to stop after its step (a KeyboardInterrupt mid-step
        would lose everything since the last checkpoint); a second signal aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("%s: stopping after this step and saving the run",
                        signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> bool:
        """Train to the budget; False if a signal stopped the run first (it is saved either way)."""
        with self._stop_on_signals():
            self._run()
        return not self.stop_requested

    def _run(self) -> None:
        a = self.args
        budget = a.minutes * 60
        st = self.stage_state
        log_path = self.out / LOG_NAME
        new_log = not log_path.exists()
        fields = ["stage", "step", "hours", "lr", "loss", "bpp", "psnr"] + [
            f"q{i + 1}_{k}" for i in range(len(self.cfg.lambdas)) for k in ("bpp", "psnr")
        ] + ["val_loss"]
        best = self.progress.get(f"best_{a.stage}", float("inf"))
        if st["seconds"] >= budget:
            # --minutes counts the minutes already run (e.g. those of --init-from's weights), so
            # a small budget on a trained stage is a silent no-op without this.
            log.warning("%s stage already has %.1f minutes, at or past --minutes %g: nothing to "
                        "train (--minutes is the stage's whole budget; pass more than %.1f)",
                        a.stage, st["seconds"] / 60, a.minutes, st["seconds"] / 60)
        with log_path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new_log:
                writer.writeheader()
            bar = tqdm(total=int(budget), initial=int(st["seconds"]), unit="s",
                       desc=f"{a.stage}", dynamic_ncols=True, mininterval=10)
            last_ckpt = last_val = time.monotonic()
            ema: dict[str, float] = {}
            t_prev = time.monotonic()
            session_steps = 0
            while st["seconds"] < budget:
                lr = self.lr_at(self.schedule_frac(st["seconds"]), session_steps)
                session_steps += 1
                for g in self.opt.param_groups:
                    g["lr"] = lr
                stats = self.step()
                now = time.monotonic()
                st["seconds"] += now - t_prev
                bar.update(int(st["seconds"]) - bar.n)
                t_prev = now
                st["steps"] += 1
                ema = {k: v if k not in ema else 0.98 * ema[k] + 0.02 * v for k, v in stats.items()}
                rate = st["steps"] / max(st["seconds"], 1e-6)
                bar.set_postfix(step=st["steps"], it_s=f"{rate:.2f}", loss=f"{ema['loss']:.3f}",
                                bpp=f"{ema['bpp']:.3f}", psnr=f"{ema['psnr']:.2f}", refresh=False)
                done = st["seconds"] >= budget
                if now - last_val > a.val_minutes * 60 or done:
                    val = self.validate()
                    hours = sum(v["seconds"] for v in self.progress.values()
                                if isinstance(v, dict)) / 3600
                    writer.writerow({"stage": a.stage, "step": st["steps"], "hours": f"{hours:.4f}",
                                     "lr": lr, **{k: f"{v:.4f}" for k, v in ema.items()},
                                     **{k: f"{v:.4f}" for k, v in val.items()}})
                    fh.flush()
                    log.info("%s step %d val %s", a.stage, st["steps"], val)
                    # Snapshots feed the learning curve (`compass-serve curve`), never selection.
                    snaps = self.out / "snapshots"
                    snaps.mkdir(exist_ok=True)
                    save_file(state_dict_for_save(self.model),
                              str(snaps / f"{a.stage}-{st['steps']:06d}.safetensors"),
                              metadata={"stage": a.stage, "step": str(st["steps"]),
                                        "hours": f"{hours:.4f}"})
                    if val["val_loss"] < best:
                        best = val["val_loss"]
                        self.progress[f"best_{a.stage}"] = best
                        self.save("best")
                    last_val = time.monotonic()
                    t_prev = last_val  # validation time is not training time
                if now - last_ckpt > a.checkpoint_minutes * 60 or done:
                    self.save("last")
                    last_ckpt = time.monotonic()
                    t_prev = last_ckpt
                if self.stop_requested:
                    log.info("%s stopped at step %d (%.1f of %.1f min); saving", a.stage,
                             st["steps"], st["seconds"] / 60, a.minutes)
                    break
            bar.close()
        self.save("last")


def run_preset(run: Path) -> str:
    """The preset a run directory was trained with (its progress.json; runs from before the
    preset was recorded there are `lite`)."""
    progress = run / "progress.json"
    record = json.loads(progress.read_text()) if progress.exists() else {}
    return str(record.get("preset", "lite"))


def train(args: TrainArgs) -> bool:
    """One stage; False if a signal stopped it before its budget."""
    return Trainer(args).run()
