"""Optional protection: an API key for writes, HMAC-signed URLs for reads.

Signed URL: `?exp=<unix seconds>&sig=<base64url(HMAC-SHA256(key, "GET\\n<path>\\n<exp>"))>`.
Only the path is signed, not the other query parameters, so one signed URL of an image serves
every `width`/`format` of it (the width limits still apply) and a signed manifest URL can be
followed by the client's own range requests on the signed bitstream URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlencode

from compass_serve.server.problems import Problem


def sign(key: str, path: str, expires: int) -> str:
    mac = hmac.new(key.encode(), f"GET\n{path}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def signed_query(key: str, path: str, ttl_s: int = 3600, now: float | None = None) -> str:
    """`exp=...&sig=...` for `path`, valid for `ttl_s` seconds."""
    exp = int((time.time() if now is None else now) + ttl_s)
    return urlencode({"exp": exp, "sig": sign(key, path, exp)})


def check_api_key(expected: str | None, x_api_key: str | None, authorization: str | None) -> bool:
    """True when no key is configured or the request carries it (X-API-Key or Bearer)."""
    if expected is None:
        return True
    given = x_api_key
    if given is None and authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_api_key(expected: str | None, x_api_key: str | None, authorization: str | None) -> None:
    if check_api_key(expected, x_api_key, authorization):
        return
    raise Problem(
        401, "this operation needs the API key (X-API-Key header or Authorization: Bearer)",
        code="unauthorized", headers={"WWW-Authenticate": "Bearer"},
    )


def require_signature(
    key: str, path: str, exp: str | None, sig: str | None, now: float | None = None
) -> None:
    if exp is None or sig is None:
        raise Problem(403, "this URL must be signed: add `exp` and `sig` query parameters",
                      code="signature_required")
    try:
        expires = int(exp)
    except ValueError:
        raise Problem(403, "`exp` must be a unix time in seconds", code="bad_signature") from None
    if expires < (time.time() if now is None else now):
        raise Problem(403, "the signed URL has expired", code="signature_expired")
    if not hmac.compare_digest(sign(key, path, expires).encode(), sig.encode()):
        raise Problem(403, "the URL signature does not match", code="bad_signature")
