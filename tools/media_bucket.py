"""Media bytes in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2, ...).

With `media_bucket: s3://bucket/prefix` beside a Postgres `database:`, the media index stays in
Postgres (tools/media_store_pg.py) and each content's bytes go to the bucket once, under the same
content-addressed name the local cache uses: `prefix/blobs/ab/abcdef....png`. Objects are written
before the rows that refer to them and removed only after no row does, so no row ever names a
missing object; bytes read back are checked against their sha256.

Credentials, region and (unless configured) the endpoint come from boto3's usual sources: the
AWS_* environment variables, ~/.aws, an instance role. Nothing secret goes in the config file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from urllib.parse import urlparse

from models.errors import ConfigError, MediaError, SignalgraphError
from tools.media_store import blob_relpath

_CONTENT_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
    ".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".mp4": "video/mp4", ".webm": "video/webm",
}


class BucketUnavailableError(SignalgraphError):
    """The bucket could not be reached, or refused this server's credentials."""


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); a clear ConfigError for anything else."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc or parsed.query or parsed.fragment:
        raise ConfigError(f"media_bucket {url!r} is not a bucket URL; write it as s3://BUCKET or s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.strip("/")


class MediaBucket:
    """One bucket and key prefix holding media bytes by sha256."""

    def __init__(self, url: str, *, endpoint_url: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_bucket_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ConfigError("media_bucket needs boto3: pip install 'signalgraph[s3]'") from None
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"})
        self._client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self._where = self.url + (f" at {endpoint_url}" if endpoint_url else "")

    def key(self, sha256: str, suffix: str) -> str:
        relpath = blob_relpath(sha256, suffix)
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def check(self) -> None:
        """Raise BucketUnavailableError unless the bucket answers (for /readyz and start-up)."""
        self._call("reach", lambda: self._client.head_bucket(Bucket=self.bucket))

    def put(self, sha256: str, suffix: str, data: bytes) -> None:
        """Store the bytes under their hash's name; writing the same bytes again changes nothing."""
        key = self.key(sha256, suffix)
        self._call("write to", lambda: self._client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=_CONTENT_TYPES.get(suffix, "application/octet-stream")))

    def get(self, sha256: str, suffix: str) -> bytes:
        """The bytes, checked against their hash; MediaError if the object is gone or altered."""
        key = self.key(sha256, suffix)
        try:
            data = self._call("read from", lambda: self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except _Missing:
            raise MediaError(f"the bytes of this medium are missing from {self.url} ({key}); attach it again") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise MediaError(f"the bytes of this medium in {self.url} ({key}) were altered; attach it again")
        return data

    def delete(self, blobs: Iterable[tuple[str, str]]) -> None:
        """Remove the objects of these (sha256, suffix) pairs; absent ones are fine."""
        keys = [{"Key": self.key(sha, suffix)} for sha, suffix in blobs]
        for first in range(0, len(keys), 1000):  # S3's limit per request
            chunk = keys[first:first + 1000]
            self._call("delete from", lambda chunk=chunk: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}))

    def _call(self, doing: str, call):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound") and doing != "reach":
                raise _Missing from None
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise BucketUnavailableError(
                    f"the media bucket {self._where} does not exist; create it first") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BucketUnavailableError(
                    f"the media bucket {self._where} refused this server's credentials ({code}); "
                    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            raise BucketUnavailableError(
                f"could not {doing} the media bucket {self._where}: {error.get('Message') or code}") from None
        except BotoCoreError as exc:
            raise BucketUnavailableError(f"could not {doing} the media bucket {self._where}: {exc}") from None


class _Missing(Exception):
    """An object that is not in the bucket (internal: callers turn it into their own answer)."""
