"""Service configuration: one object, read from `COMPASS_*` environment variables.

Every limit the service enforces lives here so that a deployment can tune it without code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

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
    encode_refine_steps: int = Field(
        0, ge=0, le=500, description="encoder latent-refinement steps per layer: a few percent "
        "fewer bytes for every stored image, at several times the encode time (0: off)",
    )
    page_size_max: int = Field(100, ge=1)
    viewer: bool = Field(True, description="serve the browser viewer page at / and /viewer")

    # -- scale-out: each part is switched on by its own setting; the defaults are embedded ----------
    queue: Literal["local", "celery"] = Field(
        "local", description="`local`: encode threads in the API process; `celery`: jobs go to "
        "Celery workers through `broker_url`",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis)")
    result_backend: str | None = Field(None, description="Celery result backend; default: the broker")
    decode_offload: bool = Field(
        False, description="with `queue=celery`: cold rendition decodes run on the workers (API "
        "nodes without a GPU); renditions are still cached on the API node",
    )
    job_max_retries: int = Field(8, ge=0, description="retries of a job after transient errors")
    job_backoff_s: float = Field(2.0, gt=0, description="first retry delay; doubles, capped")
    job_backoff_max_s: float = Field(60.0, gt=0)
    visibility_timeout_s: int = Field(
        900, ge=1, description="an unacknowledged job (its worker died) is redelivered after this "
        "long; longer than the slowest encode, or slow jobs run twice (harmless, jobs are idempotent)",
    )
    requeue_after_s: float = Field(
        600.0, gt=0, description="with `queue=celery`: images pending and untouched this long have "
        "their job published again (by API start-up and a sweep in the workers): a job lost between "
        "commit and publish, or by the broker, is not lost for good",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="worker device; auto: cuda if present")
    worker_health_port: int = Field(8001, ge=0, le=65535, description="worker /healthz, /readyz; 0: off")
    heartbeat_s: float = Field(10.0, gt=0, description="how often a worker announces itself in Redis")

    blob_store: Literal["local", "s3"] = Field("local", description="where bitstreams and uploads live")
    blob_path: Path | None = Field(
        None, description="local store directory; default: `blobs/` in the data dir (set it to a "
        "shared directory when several processes on one host share the store)",
    )
    s3_bucket: str = "compass"
    s3_prefix: str = Field("", description="key prefix inside the bucket, e.g. `prod/`")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO); default: AWS")
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_presign: bool = Field(
        False, description="bitstream GETs answer 307 to a presigned URL instead of proxying range GETs",
    )
    s3_presign_expiry_s: int = Field(300, ge=1)
    s3_create_bucket: bool = Field(True, description="create the bucket at start-up when it is missing")

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
        return self.blob_path or self.data_dir / "blobs"

    @property
    def rendition_dir(self) -> Path:
        return self.data_dir / "renditions"

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'compass.db').resolve()}"
