"""Property-based API testing: schemathesis drives the live app from its own OpenAPI document.

Every operation gets a handful of generated requests (valid and invalid by the schema); none may
cause a server error, and responses must match what the schema documents (status codes, content
types, headers, bodies).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from compass_serve.server import create_app
from tests.server_harness import LiveServer, test_settings


def _settings(data_dir: Path, store: Path) -> Any:
    return test_settings(data_dir, store)


# The document is built from the same settings as the live server without starting anything
# (create_app does no I/O), so schemathesis can parametrize at collection time. (Its lazy
# `from_fixture` loader does not work with pytest 9.)
OPENAPI = create_app(_settings(Path("unused"), Path("unused"))).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def live(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer(_settings(tmp_path_factory.mktemp("data"), tiny_store)) as srv:
        yield srv


def test_served_document_is_the_tested_one(live: LiveServer) -> None:
    assert httpx.get(f"{live.url}/openapi.json").json() == OPENAPI


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case: schemathesis.Case, live: LiveServer) -> None:
    excluded = []
    if case.operation.method.upper() == "POST":
        # Whether an upload is acceptable depends on its bytes being a decodable image within the
        # limits and on the model's quality range; no schema can express that, so schema-valid
        # uploads may rightly get 4xx. Every other check still applies.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(base_url=live.url, excluded_checks=excluded)
