"""Processes of the scaled shape for the tests: API servers and Celery workers as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.backing import free_port

REPO = Path(__file__).resolve().parents[1]


class Proc:
    """A subprocess in its own session (so SIGKILL can take its whole process group), logging to a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:  # a file, not a pipe: a full pipe would block the process
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        """SIGKILL the process and its children (a worker's pool processes): a crash."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def scaled_env(base: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPASS_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COMPASS_TORCH_THREADS": "1",
                "COMPASS_QUEUE": "celery", "PYTHONUNBUFFERED": "1"})
    env.update(base)
    return env


def launch_api(env: dict[str, str], data_dir: Path) -> tuple[Proc, str]:
    """Start an API process without waiting (several start faster side by side)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc([sys.executable, "-m", "compass_serve.cli", "serve", "--port", str(port),
                 "--data-dir", str(data_dir)], env, data_dir.parent / f"{data_dir.name}.log")
    return proc, f"http://127.0.0.1:{port}"


def _wait_for(proc: Proc, what: str, ready: Callable[[], bool], timeout: float) -> None:
    """Poll `ready` until it holds; fail fast (with the log's tail) if the process dies."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc.alive():
            raise RuntimeError(f"{what} exited: {proc.tail()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{what} did not get ready: {proc.tail()}")
        time.sleep(0.1)


def wait_api(proc: Proc, url: str, timeout: float = 120.0) -> tuple[Proc, str]:
    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(proc, "API", ready, timeout)
    return proc, url


def start_api(env: dict[str, str], data_dir: Path) -> tuple[Proc, str]:
    return wait_api(*launch_api(env, data_dir))


def launch_worker(env: dict[str, str], log: Path, name: str) -> tuple[Proc, int]:
    """Start a worker without waiting; returns it and its health port."""
    port = free_port()
    proc = Proc([sys.executable, "-m", "compass_serve.cli", "worker", "--name", name],
                {**env, "COMPASS_WORKER_HEALTH_PORT": str(port)}, log)
    return proc, port


def wait_worker(proc: Proc, name: str, timeout: float = 120.0) -> None:
    """Returns once Celery reports the worker is consuming."""
    _wait_for(proc, "worker", lambda: f"{name} ready." in proc.log.read_text(errors="replace"), timeout)


def start_worker(env: dict[str, str], log: Path, name: str) -> tuple[Proc, int]:
    proc, port = launch_worker(env, log, name)
    wait_worker(proc, name)
    return proc, port
