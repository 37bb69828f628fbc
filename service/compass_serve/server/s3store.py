"""S3-compatible blob store (AWS S3, MinIO, ...) through boto3, beside `LocalBlobStore`.

Complete-or-absent writes come from S3 itself: a single PutObject becomes visible whole or not at
all (with a Content-MD5 the server also refuses bytes damaged in transit). Range reads are range
GETs, so a decode fetches only the layers it needs. Multipart uploads are never started, so the
only leftovers an interrupted write can leave are foreign multipart uploads under the prefix,
which `recover()` aborts.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compass_serve.server.storage import BlobNotFound, check_key

_MISSING = ("NoSuchKey", "404", "NotFound")


class S3BlobStore:
    """Blobs as objects `<prefix><key>` in one bucket."""

    def __init__(self, client: Any, bucket: str, prefix: str = "", *, create_bucket: bool = False) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        if create_bucket:
            self.ensure_bucket()

    @classmethod
    def from_settings(cls, settings: Any) -> S3BlobStore:
        import boto3
        from botocore.config import Config

        secret = settings.s3_secret_access_key
        client = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
            # Short timeouts and few retries: an unreachable store should become a 503 quickly.
            config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                          s3={"addressing_style": "path"}),
        )
        return cls(client, settings.s3_bucket, settings.s3_prefix, create_bucket=settings.s3_create_bucket)

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.client.exceptions.ClientError as exc:
            if _code(exc) not in _MISSING:
                raise
            self.client.create_bucket(Bucket=self.bucket)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data, ContentMD5=md5,
                               ContentType="application/octet-stream")

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._name(key))["Body"].read()  # type: ignore[no-any-return]
        except self.client.exceptions.ClientError as exc:
            if _code(exc) in _MISSING:
                raise BlobNotFound(key) from None
            raise

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            if self.size(key) is None:
                raise BlobNotFound(key)
            return b""
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._name(key),
                                         Range=f"bytes={start}-{end - 1}")
            return obj["Body"].read()  # type: ignore[no-any-return]
        except self.client.exceptions.ClientError as exc:
            code = _code(exc)
            if code in _MISSING:
                raise BlobNotFound(key) from None
            if code == "InvalidRange":  # start past the end: the local store answers b"" too
                return b""
            raise

    def size(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._name(key))["ContentLength"])
        except self.client.exceptions.ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise

    def delete(self, key: str) -> bool:
        # DeleteObject succeeds for absent keys, so existence is asked first (not atomic; the
        # answer only feeds logs and tests).
        existed = self.size(key) is not None
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        return existed

    def keys(self, prefix: str = "") -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                        Prefix=self.prefix + prefix)
        names = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        for name in sorted(names):
            yield name[len(self.prefix):]

    def local_path(self, key: str) -> Path | None:
        return None

    def presigned_url(self, key: str, expires_s: int) -> str:
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._name(key)}, ExpiresIn=expires_s))

    def recover(self) -> int:
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix)
        uploads = listing.get("Uploads", [])
        for up in uploads:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        return len(uploads)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
