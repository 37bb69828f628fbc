"""Optional protection: API key for writes/deletes, HMAC-signed GET URLs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compass_serve.server.security import sign, signed_query
from tests.conftest import photo
from tests.server_harness import LiveServer, png_bytes, test_settings

KEY = "s3cret-api-key"
SIGNING = "hmac-signing-key"


@pytest.fixture(scope="module")
def server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = test_settings(tmp_path_factory.mktemp("data"), tiny_store, api_key=KEY, signing_key=SIGNING)
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def image_id(client: httpx.Client) -> str:
    r = client.post("/images", content=png_bytes(photo(40, 30)), params={"wait": "true"},
                    headers={"X-API-Key": KEY})
    assert r.status_code == 201
    return str(r.json()["id"])


def test_writes_need_the_api_key(client: httpx.Client, image_id: str) -> None:
    body = png_bytes(photo(40, 30, seed=2))
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = client.post("/images", content=body, headers=headers)
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
        assert "API key" in r.json()["detail"]
        assert client.delete(f"/images/{image_id}", headers=headers).status_code == 401
    r = client.post("/images", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 202


def test_reads_need_a_signature(client: httpx.Client, image_id: str) -> None:
    path = f"/images/{image_id}"
    assert client.get(path, params={"width": 20}).status_code == 403
    assert "signed" in client.get(f"{path}/manifest").json()["detail"]
    # A signed path serves any width/format of the image.
    q = signed_query(SIGNING, path, ttl_s=60)
    assert client.get(f"{path}?{q}&width=20").status_code == 200
    assert client.get(f"{path}?{q}&width=31&format=png").status_code == 200
    # ...but not another path, an expired URL or a tampered signature.
    assert client.get(f"{path}/bitstream?{q}").status_code == 403
    old = int(time.time()) - 10
    r = client.get(path, params={"exp": old, "sig": sign(SIGNING, path, old)})
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    exp = int(time.time()) + 60
    r = client.get(path, params={"exp": exp, "sig": sign(SIGNING, path, exp)[:-2] + "AA"})
    assert r.status_code == 403 and "does not match" in r.json()["detail"]
    # The API key holder reads without signatures.
    assert client.get(f"{path}/manifest", headers={"X-API-Key": KEY}).status_code == 200


def test_schema_documents_the_protection(client: httpx.Client) -> None:
    schema = client.get("/openapi.json").json()
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    params = {p["name"] for p in schema["paths"]["/images/{image_id}"]["get"]["parameters"]}
    assert {"exp", "sig", "width"} <= params
