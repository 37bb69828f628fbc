"""Service configuration: one object, read from `COMPASS_*` environment variables.

Every limit the service enforces lives here so that a deployment can tune it without code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Pillow format names accepted for upload unless configured otherwise. MPO is JPEG with extra
#: frames (phone cameras): Pillow refines "JPEG" to "MPO" while opening.
DEFAULT_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "AVIF", "TIFF", "BMP", "GIF"})

#: Output formats a rendition can be encoded in (`format=` / `Accept`).
OUTPUT_FORMATS = ("png", "jpeg", "webp", "avif")


class Settings(BaseSettings):
    """All settings of the HTTP service; environment variables use the `COMPASS_` prefix."""

    model_config = SettingsConfigDict(env_prefix="COMPASS_", extra="ignore")

    # -- where and what ---------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Path("./data")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file `compass.db` in the data dir"
    )
    model: str = Field("lite", description="model name in the model store")
    model_store: Path | None = Field(
        None, description="model store directory; default: the repository's model_store/"
    )

    # -- upload limits ------------------------------------------------------------------------
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_pixels: int = Field(25_000_000, ge=1, description="also Pillow's decompression-bomb guard")
    max_side: int = Field(16384, ge=1, le=65535, description="longest side of an upload")
    formats: Annotated[frozenset[str], NoDecode] = DEFAULT_FORMATS
    max_layers: int = Field(8, ge=1, le=32)

    # -- rendition limits ---------------------------------------------------------------------
    max_width: int = Field(8192, ge=1, le=65535, description="largest width a GET may ask for")
    max_dpr: float = Field(4.0, ge=1.0)
    output_quality: int = Field(85, ge=1, le=100, description="JPEG/WebP/AVIF output quality")
    rendition_cache_bytes: int = Field(256 * 1024 * 1024, ge=0)

    # -- work -----------------------------------------------------------------------------------
    encode_workers: int = Field(1, ge=1, description="encode threads")
    queue_size: int = Field(16, ge=1, description="encode jobs waiting; beyond it POST answers 503")
    decode_workers: int = Field(2, ge=1, description="concurrent rendition decodes")
    decode_queue_size: int = Field(64, ge=1, description="decodes waiting; beyond it GET answers 503")
    retry_after_s: int = Field(5, ge=1, description="Retry-After on 503")
    wait_timeout_s: float = Field(120.0, gt=0, description="longest `wait=true` holds a request")
    torch_threads: int = Field(
        1, ge=0,
        description="torch intra-op threads; 1 avoids oversubscription with several workers, "
        "0 keeps torch's default",
    )
    page_size_max: int = Field(100, ge=1)
    viewer: bool = Field(True, description="serve the browser viewer page at / and /viewer")

    # -- protection ---------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="required for POST/DELETE when set")
    signing_key: SecretStr | None = Field(
        None, description="when set, GETs under /images need `exp` + `sig` (or the API key)"
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _split_formats(cls, value: object) -> object:
        # Environment values are plain strings: accept "png,jpeg" as well as a list.
        if isinstance(value, str):
            value = [v for v in value.replace(" ", ",").split(",") if v]
        if isinstance(value, list | tuple | set | frozenset):
            return frozenset(str(v).upper() for v in value)
        return value

    # -- derived paths ------------------------------------------------------------------------
    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def rendition_dir(self) -> Path:
        return self.data_dir / "renditions"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'compass.db').resolve()}"
