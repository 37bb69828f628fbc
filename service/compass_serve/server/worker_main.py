"""`compass-serve worker`: a Celery worker process plus its health endpoint and heartbeat.

The worker says which device it runs on three ways: in its log at start, on `GET /readyz`
(`COMPASS_WORKER_HEALTH_PORT`, for container health checks), and in a Redis heartbeat that the
API processes list in their own `/readyz`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from sqlalchemy import text

from compass_serve.codec.registry import load_model
from compass_serve.server.celery_app import DECODE_QUEUE, ENCODE_QUEUE
from compass_serve.server.celery_worker import create_worker_app, device_label, pick_device
from compass_serve.server.db import Database
from compass_serve.server.jobs import WORKER_KEY, CeleryQueue
from compass_serve.server.settings import Settings
from compass_serve.server.worker import republish_stale

SWEEP_LOCK = "compass:stale-sweep"

log = logging.getLogger("compass_serve.worker")


class WorkerHealth:
    """Readiness of this worker: weights loadable, database and broker reachable; plus its device."""

    def __init__(self, settings: Settings, device: str, weights_error: str | None) -> None:
        self.settings = settings
        self.device = device
        self.weights_error = weights_error
        self.db = Database(settings.db_url)
        self.redis = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=5)

    def checks(self) -> dict[str, str]:
        out = {"weights": self.weights_error or "ok", "device": f"ok: {self.device}"}
        try:
            with self.db.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            out["database"] = "ok"
        except Exception as exc:
            out["database"] = f"unreachable: {type(exc).__name__}"
        try:
            self.redis.ping()
            out["broker"] = "ok"
        except redis.RedisError as exc:
            out["broker"] = f"unreachable: {type(exc).__name__}"
        return out

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, {"status": "ok", "device": health.device})
                elif self.path == "/readyz":
                    checks = health.checks()
                    ok = all(v == "ok" or v.startswith("ok:") for v in checks.values())
                    self._send(200 if ok else 503, {"status": "ready" if ok else "not ready",
                                                    "device": health.device, "checks": checks})
                else:
                    self._send(404, {"status": "not found"})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass  # health probes every few seconds would drown the worker's log

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()
        return server

    def heartbeat_forever(self, name: str, stop: threading.Event) -> None:
        interval = self.settings.heartbeat_s
        while not stop.is_set():
            # While the broker is down the worker's own reconnect logic reports it; skip a beat.
            with contextlib.suppress(redis.RedisError):
                self.redis.set(WORKER_KEY + name, self.device, ex=max(1, int(3 * interval)))
            stop.wait(interval)


def sweep_forever(settings: Settings, queue: CeleryQueue, name: str, stop: threading.Event) -> None:
    """Re-publish lost jobs; one worker at a time does it (a Redis lock per period)."""
    period = max(1.0, settings.requeue_after_s / 4)
    db = Database(settings.db_url)
    while not stop.wait(period):
        try:
            if queue.redis.set(SWEEP_LOCK, name, nx=True, px=int(period * 1000)):
                republish_stale(db, queue, settings.requeue_after_s)
        except Exception as exc:  # an outage: the next period tries again
            log.debug("stale-job sweep skipped: %s", exc)


def run_worker(settings: Settings, *, concurrency: int = 1, pool: str = "prefork",
               name: str | None = None, queues: str = f"{ENCODE_QUEUE},{DECODE_QUEUE}") -> None:
    """Run a worker until it is stopped (blocking)."""
    device = pick_device(settings.device)
    name = name or f"compass@{socket.gethostname()}"
    log.info("compass worker %s starting on %s (model %s)", name, device_label(device), settings.model)
    weights_error = None
    try:
        load_model(settings.model, settings.model_store)  # fail readiness early on missing weights
    except (LookupError, ValueError, OSError) as exc:
        weights_error = f"cannot load model {settings.model!r}: {exc}"
        log.error(weights_error)
    health = WorkerHealth(settings, device, weights_error)
    if settings.worker_health_port:
        health.serve(settings.host, settings.worker_health_port)
    stop = threading.Event()
    threading.Thread(target=health.heartbeat_forever, args=(name, stop), name="worker-heartbeat",
                     daemon=True).start()
    Database(settings.db_url).migrate()  # a worker may be the first process up
    app, _runtime = create_worker_app(settings)
    threading.Thread(target=sweep_forever, args=(settings, CeleryQueue(settings, app), name, stop),
                     name="stale-job-sweep", daemon=True).start()
    try:
        app.worker_main(["worker", "--loglevel=INFO", f"--concurrency={concurrency}", f"--pool={pool}",
                         f"--hostname={name}", f"--queues={queues}", "--without-gossip", "--without-mingle",
                         "--without-heartbeat"])
    finally:
        stop.set()
