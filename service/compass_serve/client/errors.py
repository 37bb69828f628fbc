"""Typed SDK exceptions: callers catch what they can act on."""

from __future__ import annotations


class CompassError(Exception):
    """Base class of every SDK error."""


class TransportError(CompassError):
    """The server could not be reached or the connection broke (after retries)."""


class NotFound(CompassError):
    """No image with that id (404)."""


class NotReady(CompassError):
    """The image is not decodable yet (`pending`) or never will be (`failed`)."""

    def __init__(self, image_id: str, status: str, reason: str | None = None) -> None:
        self.image_id, self.status, self.reason = image_id, status, reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"image {image_id} is {status}{detail}")


class ModelMismatch(CompassError):
    """The image was encoded with weights this client does not hold."""


class RequestRejected(CompassError):
    """The server refused the request (4xx other than 404); `status` and the server's reason."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"HTTP {status}: {reason}")


class ServerError(CompassError):
    """The server failed (5xx), or stayed unavailable (503/429) through every retry."""

    def __init__(self, status: int, reason: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"HTTP {status}: {reason}")


class TruncatedResponse(TransportError):
    """Fewer bytes arrived than the range asked for (after retries)."""
