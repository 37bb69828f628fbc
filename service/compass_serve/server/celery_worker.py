"""The worker side of the scaled shape: Celery tasks that encode (and decode) on this machine's GPU.

`create_worker_app(settings)` registers the tasks on a fresh Celery app. Each process that runs
tasks (a prefork child) builds its own `WorkerRuntime` on first use: database engine, blob store
and the codec on the chosen device. Nothing is module-global, so tests can run several apps.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable

import torch
from celery import Celery, Task
from celery.signals import worker_process_init

from compass_serve.codec.coder import Codec
from compass_serve.imageio import InputLimits, encode_image
from compass_serve.server.celery_app import ENCODE_TASK, RENDER_TASK, make_celery
from compass_serve.server.db import Database
from compass_serve.server.encoder import (
    FAILED_OUTCOME,
    Encoder,
    TransientError,
    reference_formats,
    stream_key,
)
from compass_serve.server.settings import Settings
from compass_serve.server.storage import open_store

log = logging.getLogger("compass_serve.worker")


def pick_device(preference: str) -> str:
    """`cuda` when asked for (or `auto`) and present, else `cpu`."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if preference == "cuda":
        log.warning("COMPASS_DEVICE=cuda but no CUDA device is usable: falling back to cpu")
    return "cpu"


def device_label(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


class WorkerRuntime:
    """Everything a task needs, built once per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.db = Database(settings.db_url)
        self.store = open_store(settings)
        self.codec = Codec.load(settings.model, settings.model_store)
        self.codec.model.to(self.device)
        self.limits = InputLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                                  max_side=settings.max_side, formats=settings.formats)
        self.encoder = Encoder(self.db, self.store, lambda: self.codec, self.limits, device=self.device,
                               reference_quality=settings.output_quality,
                               refine_steps=settings.encode_refine_steps,
                               reference_formats=reference_formats())
        log.info("worker process ready: model %s on %s", settings.model, device_label(self.device))


    def codec_for(self, model: str, weights_id: str) -> Codec:
        """The served weights, or the archived version a stream was coded with (the registry
        caches loaded models; moving one already on the device is a no-op)."""
        if model == self.codec.name and weights_id == self.codec.weights_id.hex():
            return self.codec
        codec = Codec.load(model, self.settings.model_store, bytes.fromhex(weights_id))
        codec.model.to(self.device)
        return codec


def create_worker_app(settings: Settings) -> tuple[Celery, Callable[[], WorkerRuntime]]:
    """A Celery app with the encode and render tasks, and the per-process runtime getter."""
    app = make_celery(settings)
    # Loading weights in a fresh child may take longer than Celery's 4 s default allows.
    app.conf.worker_proc_alive_timeout = 120
    holder: dict[str, WorkerRuntime] = {}
    lock = threading.Lock()

    def runtime() -> WorkerRuntime:
        with lock:
            if "rt" not in holder:
                holder["rt"] = WorkerRuntime(settings)
            return holder["rt"]

    @app.task(name=ENCODE_TASK, bind=True, max_retries=settings.job_max_retries)
    def encode(self: Task, image_id: str) -> str:
        rt = runtime()
        try:
            return rt.encoder.run(image_id, retry_transient=True)
        except TransientError as exc:
            retries = int(self.request.retries or 0)
            if retries >= settings.job_max_retries:
                # Recorded on the row, so the manifest says why (if the database is reachable; if
                # not, the row stays pending and API start-up re-publishes it later).
                rt.encoder.fail(image_id, f"encoding failed: a backing service stayed unavailable "
                                f"through {retries + 1} attempts ({exc})")
                return FAILED_OUTCOME
            countdown = min(settings.job_backoff_s * 2 ** retries, settings.job_backoff_max_s)
            raise self.retry(exc=exc, countdown=countdown) from None

    @app.task(name=RENDER_TASK, ignore_result=False)
    def render(image_id: str, end: int, width: int, fmt: str, quality: int | None,
               model: str, weights_id: str) -> str:
        rt = runtime()
        prefix = rt.store.read_range(stream_key(image_id), 0, end)
        out = rt.codec_for(model, weights_id).decode(prefix, width=width)
        # JSON results: base64 of the encoded image (renditions are small next to the stream).
        return base64.b64encode(encode_image(out.image, fmt, quality=quality)).decode()

    def _preload(**_: object) -> None:
        runtime()  # a prefork child loads its model before taking its first job

    worker_process_init.connect(_preload, weak=False)
    return app, runtime
