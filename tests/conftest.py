"""Shared fixtures: a model store with tiny random-weight models, and small test images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from compass_serve.codec.coder import Codec
from compass_serve.codec.registry import PRESETS, build, save_model

if TYPE_CHECKING:
    from tests.backing import ExternalPostgres, PostgresServer
    from tests.server_harness import LiveServer

REPO = Path(__file__).resolve().parents[1]
KODAK = REPO.parent / "shared" / "data" / "kodak"


def make_tiny(store: Path, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    save_model(build(PRESETS["tiny"]), name, "tiny", store, note="random weights for unit tests")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    make_tiny(store, "tiny", seed=0)
    make_tiny(store, "tiny-other", seed=1)
    return store


@pytest.fixture(scope="session")
def tiny_codec(tiny_store: Path) -> Codec:
    return Codec.load("tiny", tiny_store)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photo-like test image (gradients + blobs + a little noise), deterministic."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([
        128 + 90 * np.sin(xx / (7 + 5 * c) + yy / (11 + 3 * c) + c) for c in range(3)
    ], -1)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture()
def small_photo() -> Image.Image:
    return photo(53, 37)


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live server on the tiny model with default test settings, one per test module (modules
    that need other settings define their own `server`)."""
    from tests.server_harness import LiveServer, test_settings

    with LiveServer(test_settings(tmp_path_factory.mktemp("data"), tiny_store)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An httpx client for the module's `server` fixture (each server test module defines one)."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | ExternalPostgres]:
    """PostgreSQL for the session (each test makes its own database): the server CI started
    (COMPASS_TEST_DATABASE_URL), else a throw-away one. Tests that stop the server start their own."""
    import os

    from tests.backing import ExternalPostgres, PostgresServer

    external = os.environ.get("COMPASS_TEST_DATABASE_URL")
    server = ExternalPostgres(external) if external else PostgresServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Redis for the session: the server CI started (COMPASS_TEST_REDIS_URL), else a throw-away one."""
    import os

    from tests.backing import RedisServer

    external = os.environ.get("COMPASS_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3-compatible server on loopback (stands in for S3 / MinIO in tests)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly when the browser tests did not run: a skip must not read as a pass."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "browser" in r.keywords]
    if not skipped:
        return
    longrepr = skipped[0].longrepr
    reason = (longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)).removeprefix("Skipped: ")
    terminalreporter.section("BROWSER TESTS DID NOT RUN", sep="!", red=True, bold=True)
    terminalreporter.write_line(f"{len(skipped)} viewer browser test(s) skipped: {reason}",
                                red=True, bold=True)
    terminalreporter.write_line("the viewer page is untested in a browser; install Chromium with "
                                "`apt-get install -y chromium chromium-driver` (as .ci/run does)",
                                red=True, bold=True)
