"""RFC 9457 problem details: every error the service answers is one `application/problem+json` shape.

`Problem` is raised by the service's own code; the handlers installed by `install()` also convert
the framework's errors (404 for unknown routes, 405, request validation) and anything unexpected
(500, logged with its traceback but never sent to the client), except outages of a shared
dependency (database, broker, object store), which are 503 + Retry-After.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("compass_serve.server")

PROBLEM_MEDIA_TYPE = "application/problem+json"
# Our problem types are tag URIs (RFC 4151): stable identifiers that need no web page.
TYPE_PREFIX = "tag:compass-serve,2025:problem:"


class ProblemModel(BaseModel):
    """The error body (RFC 9457). `code` is a stable machine-readable name of the problem."""

    type: str = Field("about:blank", description="URI reference naming the problem type")
    title: str = Field(description="short, human summary of the problem type")
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="human explanation of this occurrence")
    instance: str | None = Field(None, description="the request path")
    code: str = Field(description="machine-readable problem name, e.g. `not_found`")
    errors: list[dict[str, Any]] | None = Field(None, description="per-field validation errors")


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


class Problem(Exception):
    """An error answer: raise it anywhere in a request and the client gets a problem document."""

    def __init__(
        self, status: int, detail: str, *, code: str | None = None, title: str | None = None,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or _default_code(status)
        self.title = title or _phrase(status)
        self.headers = headers or {}
        self.extra = extra

    def response(self, instance: str | None = None) -> ProblemResponse:
        body: dict[str, Any] = {
            "type": TYPE_PREFIX + self.code if self.code != _default_code(self.status) else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance is not None:
            body["instance"] = instance
        body.update(self.extra)
        return ProblemResponse(body, status_code=self.status, headers=self.headers)


def image_not_found(image_id: str) -> Problem:
    """The 404 of every route that names an image which does not exist (or no longer does)."""
    return Problem(404, f"no image with id {image_id!r}", code="not_found")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _default_code(status: int) -> str:
    return _phrase(status).lower().replace(" ", "_").replace("-", "_").replace("'", "")


def _loc(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "header", "body", "cookie"):
        kind, rest = parts[0], parts[1:]
        return f"{kind} parameter {'.'.join(rest)}" if rest else kind
    return ".".join(parts)


async def _problem_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, Problem)
    return exc.response(request.url.path)


async def _http_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
        # Starlette's Allow lists only the first route that matched the path; a path served by
        # several routes (GET, HEAD, DELETE) must list them all: take them from the API document.
        allowed = allowed_methods(request.app, request.url.path)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return Problem(exc.status_code, detail, headers=headers).response(request.url.path)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Methods the OpenAPI document lists for the path template matching `path`."""
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(app.state, "allow_table", None)
    if table is None:
        table = []
        for template, item in app.openapi().get("paths", {}).items():
            regex = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
            methods = sorted(m.upper() for m in item if m in _HTTP_METHODS)
            table.append((re.compile(regex), methods))
        app.state.allow_table = table
    for regex, methods in table:
        if regex.match(path):
            return methods
    return []


_HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}


async def _validation_handler(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    hints: dict[str, str] = getattr(request.app.state, "pattern_hints", {})
    errors = []
    for e in exc.errors():
        message = e.get("msg", "")
        if e.get("type") == "string_pattern_mismatch":
            # "String should match pattern '^\s*[0-9]...'" means little to a person.
            hint = hints.get(str((e.get("ctx") or {}).get("pattern", "")))
            if hint:
                message = f"expected {hint}, got {e.get('input')!r}"
        errors.append({"location": _loc(e.get("loc", ())), "message": message, "type": e.get("type", "")})
    detail = "; ".join(f"{e['location']}: {e['message']}" for e in errors) or "invalid request"
    return Problem(422, detail, code="validation_error", errors=errors).response(request.url.path)


async def _unexpected_handler(request: Request, exc: Exception) -> ProblemResponse:
    from compass_serve.server.transient import dependency_name, is_transient

    if is_transient(exc):
        # A shared dependency is down (database restart, broker outage): a temporary condition the
        # client should retry, not a bug. Logged briefly; the service reconnects by itself.
        settings = getattr(request.app.state, "settings", None)
        retry_after = str(getattr(settings, "retry_after_s", 5))
        what = dependency_name(exc)
        log.warning("%s unavailable on %s %s: %s", what, request.method, request.url.path,
                    type(exc).__name__)
        return Problem(503, f"the {what} is unavailable; try again later", code="dependency_unavailable",
                       headers={"Retry-After": retry_after}).response(request.url.path)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Problem(500, "internal server error; the failure was logged").response(request.url.path)


def install(app: FastAPI) -> None:
    """Route every error through the problem handlers."""
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(Exception, _unexpected_handler)


def problem_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite an OpenAPI document so every 4xx/5xx response is documented as a problem."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = ProblemModel.model_json_schema(ref_template="#/components/schemas/{model}")
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            if not isinstance(op, dict):
                continue
            for code, resp in op.get("responses", {}).items():
                if code.isdigit() and int(code) >= 400:
                    resp["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
                    if resp.get("description") in (None, "", "Validation Error"):
                        resp["description"] = _phrase(int(code))
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema
