"""Container files: the compose file against the compose-spec schema, and what the issue asks of them.

There is no Docker engine on the test machines, so these check the files themselves.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from compass_serve.server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    # Vendored from github.com/compose-spec/compose-spec (schema/compose-spec.json): no network here.
    schema = json.loads((DOCKER / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any],
                                               validator: jsonschema.Draft7Validator) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
    # The validator is live: the same file with a misspelt key, or a wrong shape, is refused.
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["deploy"]["replica"] = 2
    assert list(validator.iter_errors(broken))
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] = "gpu"
    assert list(validator.iter_errors(broken))


def test_compose_has_the_scaled_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "worker", "redis", "postgres", "minio"} <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["api"]["command"] == ["api"] and services["worker"]["command"][0] == "worker"
    assert services["api"]["build"] == services["worker"]["build"]  # one image, role by command
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in gpu)
    assert services["worker-cpu"]["profiles"] == ["cpu"]  # the fallback without a GPU
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        assert svc.get("volumes"), f"{name} has no volume"
    for name in ("redis", "postgres", "minio"):
        assert services[name]["volumes"][0].split(":")[0] in compose["volumes"]  # named: data survives
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert all(deps[s]["condition"] == "service_healthy" for s in ("postgres", "redis", "minio"))


def _env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def test_example_env_files_name_real_settings_and_agree(compose: dict[str, Any]) -> None:
    env = _env_file(DOCKER / "compass.example.env")
    fields = {f"COMPASS_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"unknown settings: {set(env) - fields}"
    settings = Settings(**{k.removeprefix("COMPASS_").lower(): v for k, v in env.items()})
    assert (settings.queue, settings.blob_store) == ("celery", "s3")
    assert settings.db_url.startswith("postgresql+psycopg://")
    pg, minio = _env_file(DOCKER / "postgres.example.env"), _env_file(DOCKER / "minio.example.env")
    user, password, db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    assert f"{user}:{password}@postgres:5432/{db}" in settings.db_url
    assert (env["COMPASS_S3_ACCESS_KEY_ID"], env["COMPASS_S3_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"])
    for svc in compose["services"].values():
        for f in svc.get("env_file", []):
            assert (REPO / f).is_file(), f


def test_dockerfile_is_multi_stage_non_root_and_installs_like_ci() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in text
    # The same install rule as `make test` (Makefile `venv` target), not a second recipe.
    assert "make venv" in text and "venv: $(STAMP)" in (REPO / "Makefile").read_text()
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in copied.split():
            assert (REPO / src).exists(), f"Dockerfile copies missing {src}"


def test_entrypoint_dispatches_roles(tmp_path: Path) -> None:
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    bindir = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
           "COMPASS_DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}
    out = subprocess.run([str(script), "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "schema at revision" in out.stdout
    assert subprocess.run([str(script), "true"], env=env).returncode == 0  # anything else: run as is
