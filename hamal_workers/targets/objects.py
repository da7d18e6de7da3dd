"""One S3-compatible bucket as the chunk store sees it: keys under a prefix, whole objects.

boto3 does the protocol. What is decided here:

- **Retries**: botocore's "standard" mode, `[s3] max_attempts` attempts per request, with
  its backoff, on throttling (SlowDown, 503, 429), 5xx answers and dropped or timed-out
  connections. A request that still fails becomes an `ObjectError` that names the
  endpoint, the bucket, the key and the answer -- never a key or a secret.
- **Compatibility**: checksums only where the API requires them (OSS, RGW and older MinIO
  refuse the newer default ones), the addressing style from config, the region's
  signature (SigV4).
- **Trust**: the endpoint's certificate is verified with `ca_bundle` or the system's CAs;
  `insecure` turns that off, for tests only.
- **Threads**: one client per object, shared by the writer threads (boto3 clients are
  thread-safe), with as many pooled connections as there are writers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hamal_workers.targets.base import TargetError

if TYPE_CHECKING:
    from hamal_workers.config import S3Section

_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


class ObjectError(TargetError):
    """A bucket operation failed for good; the message says which, where and why."""


class ObjectMissing(ObjectError):
    """The key (or the bucket) does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # without the store's prefix
    size: int
    metadata: dict[str, str] = field(default_factory=dict)
    modified: float = 0.0  # Unix time of its last write, where the answer carries it


class Bucket:
    """A bucket and a key prefix: every key given or returned here is relative to it."""

    def __init__(self, section: S3Section, *, pool: int = 10) -> None:
        if not section.bucket:
            raise ObjectError("[s3] bucket is empty: expected the bucket of the chunk store")
        self.section = section
        self.name = section.bucket
        self.prefix = section.prefix.strip("/") + "/" if section.prefix.strip("/") else ""
        self.endpoint = section.endpoint_url or f"AWS S3 ({section.region})"
        self._client = _client(section, pool)

    def __repr__(self) -> str:
        return f"Bucket({self.endpoint!r}, {self.name!r}, prefix={self.prefix!r})"

    def where(self, key: str = "") -> str:
        return f"s3://{self.name}/{self.prefix}{key} at {self.endpoint}"

    # --- objects -------------------------------------------------------------------------
    def put(self, key: str, body: bytes | bytearray | memoryview,
            metadata: dict[str, str] | None = None) -> None:  # fmt: skip
        """Write a whole object; it appears all at once, only when the PUT succeeded."""
        with self._errors("writing", key):
            self._client.put_object(
                Bucket=self.name, Key=self.prefix + key, Body=bytes(body),
                Metadata=metadata or {},
            )  # fmt: skip

    def get(self, key: str, first: int | None = None, last: int | None = None) -> bytes:
        """The object, or bytes first..last (inclusive) of it; ObjectMissing when absent."""
        extra = {} if first is None else {"Range": f"bytes={first}-{'' if last is None else last}"}
        with self._errors("reading", key):
            answer = self._client.get_object(Bucket=self.name, Key=self.prefix + key, **extra)
            return bytes(answer["Body"].read())

    def head(self, key: str) -> ObjectInfo | None:
        """Size and metadata of the object, None when it does not exist."""
        try:
            with self._errors("looking up", key):
                answer = self._client.head_object(Bucket=self.name, Key=self.prefix + key)
        except ObjectMissing:
            return None
        return ObjectInfo(key, int(answer["ContentLength"]), dict(answer.get("Metadata") or {}))

    def copy(self, source: str, key: str) -> None:
        """A server-side copy: no bytes through the proxy."""
        with self._errors("copying to", key):
            self._client.copy_object(
                Bucket=self.name, Key=self.prefix + key,
                CopySource={"Bucket": self.name, "Key": self.prefix + source},
                MetadataDirective="COPY",
            )  # fmt: skip

    def delete(self, keys: Iterable[str]) -> None:
        """Delete the keys (absent ones are no error), a thousand per request."""
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, keys: list[str]) -> None:
        with self._errors("deleting", keys[0]):
            answer = self._client.delete_objects(
                Bucket=self.name,
                Delete={"Objects": [{"Key": self.prefix + k} for k in keys], "Quiet": True},
            )
        failed = [e for e in answer.get("Errors") or [] if e.get("Code") != "NoSuchKey"]
        if failed:
            first = failed[0]
            raise ObjectError(
                f"s3: deleting {len(failed)} of {len(keys)} objects failed at "
                f"{self.where()}: {first.get('Code')} ({first.get('Message')}) for "
                f"{first.get('Key')}"
            )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under prefix, in key order, page by page (metadata not included)."""
        with self._errors("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents") or []:
                    modified = item["LastModified"].timestamp() if "LastModified" in item else 0
                    yield ObjectInfo(item["Key"][len(self.prefix) :], int(item["Size"]),
                                     modified=modified)  # fmt: skip

    def children(self, prefix: str) -> Iterator[str]:
        """The names one level below prefix (which ends in "/"), as a directory listing."""
        with self._errors("listing", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=self.prefix + prefix, Delimiter="/"
            )
            start = len(self.prefix + prefix)
            for page in pages:
                for common in page.get("CommonPrefixes") or []:
                    yield common["Prefix"][start:].rstrip("/")
                for item in page.get("Contents") or []:
                    yield item["Key"][start:]

    def check(self) -> None:
        """That the bucket exists and these credentials may use it: a clear error if not."""
        with self._errors("opening the bucket", ""):
            self._client.head_bucket(Bucket=self.name)

    # --- errors --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, doing: str, key: str) -> Iterator[None]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
            SSLError,
        )

        where = self.where(key)
        attempts = self.section.max_attempts
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error") or {}
            code = str(error.get("Code") or "")
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            message = " ".join(str(error.get("Message") or "").split())[:200]
            if code in ("NoSuchKey", "404", "NotFound") and status == 404 and key:
                raise ObjectMissing(f"s3: {where} does not exist") from None
            if code == "NoSuchBucket" or (status == 404 and not key):
                raise ObjectMissing(
                    f"s3: bucket {self.name} does not exist at {self.endpoint}: check [s3] "
                    "bucket and endpoint_url"
                ) from None
            if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId",
                                         "SignatureDoesNotMatch"):  # fmt: skip
                raise ObjectError(
                    f"s3: {self.endpoint} refused {doing} {where} ({code or status}: {message}):"
                    " check [s3] access_key and secret_key and the bucket's policy"
                ) from None
            raise ObjectError(
                f"s3: {doing} {where} failed after up to {attempts} attempts: "
                f"{code or status} ({message})"
            ) from None
        except SSLError as exc:
            raise ObjectError(
                f"s3: the certificate of {self.endpoint} is not trusted ({_short(exc)}): set "
                "[s3] ca_bundle to the CA that signed it"
            ) from None
        except NoCredentialsError:
            raise ObjectError(
                "s3: no credentials: set [s3] access_key and secret_key, or the AWS "
                "environment or files"
            ) from None
        except (ConnectionError, BotoCoreError) as exc:
            raise ObjectError(
                f"s3: {doing} {where} failed after {attempts} attempts: {_short(exc)}"
            ) from None


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _client(section: S3Section, pool: int) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=section.region,
        signature_version="s3v4",
        s3={"addressing_style": section.addressing_style},
        retries={"mode": "standard", "total_max_attempts": section.max_attempts},
        connect_timeout=section.connect_timeout,
        read_timeout=section.read_timeout,
        max_pool_connections=max(pool, 1),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
    )
    verify: bool | str = section.ca_bundle or True
    if section.insecure:
        verify = False
    # A session of its own: boto3's default one is not thread-safe to create clients from.
    session = boto3.session.Session(
        aws_access_key_id=section.access_key or None,
        aws_secret_access_key=section.secret_key or None,
    )
    return session.client(
        "s3", endpoint_url=section.endpoint_url or None, config=config, verify=verify
    )
