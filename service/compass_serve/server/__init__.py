"""The HTTP service: `create_app(Settings(...))` builds a FastAPI app over the codec."""

from compass_serve.server.app import create_app
from compass_serve.server.settings import Settings

__all__ = ["Settings", "create_app"]
