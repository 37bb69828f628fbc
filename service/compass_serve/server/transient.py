"""Which errors mean "a shared dependency is unreachable right now" (retry / answer 503).

Database, broker and object-store outages are expected in a scaled deployment: they must turn into
retries (jobs) or 503 + Retry-After (requests), never into a job marked failed or a 500.
"""

from __future__ import annotations

import socket


def _types() -> tuple[type[BaseException], ...]:
    import botocore.exceptions as bce
    import kombu.exceptions
    import redis.exceptions
    import sqlalchemy.exc

    return (
        sqlalchemy.exc.OperationalError,  # connection refused / lost, server shutting down
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.TimeoutError,  # connection pool exhausted while the database hangs
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        kombu.exceptions.OperationalError,  # broker unreachable while publishing
        bce.EndpointConnectionError,
        bce.ConnectionClosedError,
        bce.ReadTimeoutError,
        bce.ConnectTimeoutError,
        ConnectionError,
        socket.timeout,
    )


_TYPES: tuple[type[BaseException], ...] | None = None


def is_transient(exc: BaseException) -> bool:
    global _TYPES  # a cache of imported classes, not state: computed once, never changed
    if _TYPES is None:
        _TYPES = _types()
    if isinstance(exc, _TYPES):
        return True
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    response = getattr(exc, "response", None)  # botocore ClientError: 5xx / throttling are retryable
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = response.get("Error", {}).get("Code", "")
        return bool(status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"))
    return False


def dependency_name(exc: BaseException) -> str:
    """Which dependency an error came from, for the 503's detail."""
    mod = type(exc).__module__
    if mod.startswith(("sqlalchemy", "psycopg")):
        return "database"
    if mod.startswith(("redis", "kombu", "celery")):
        return "job queue"
    if mod.startswith(("botocore", "boto3", "urllib3")):
        return "object store"
    return "a backing service"
