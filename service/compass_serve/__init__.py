"""compass-serve: progressive image delivery on COMPASS, a learned scalable image codec."""

import warnings

# compressai 1.2.8 calls torch.jit.script at import; torch 2.14 warns about it on every start.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> object:
    # `from compass_serve import Client, AsyncClient` without importing httpx/torch up front.
    if name in ("Client", "AsyncClient"):
        from compass_serve import client

        return getattr(client, name)
    raise AttributeError(name)
