"""Audio objects: S3 (MinIO, or any S3 server) through the ``minio`` package, or a local directory.

Both stores apply the same two spooled operations, ``put_object`` (idempotent: the same key with the
same bytes) and ``delete_prefix``, so the spool writer needs no idea which one it feeds.

The minio client is synchronous; it runs in worker threads through a limiter, with urllib3 retries
switched off and short timeouts, because the spool writer does its own retrying with backoff and must
notice an outage within seconds. The region is fixed up front so that presigning needs no network call.

The local store has no presigned URLs; :meth:`LocalBlobs.presigned_url` returns a relative URL under
``/api/v1/audio/`` that the admin API serves (behind the same admin token as the rest of the API).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import trio
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from voicegrow.atomicfile import atomic_write
from voicegrow.storage.errors import BackendUnavailable, InvalidKey, RecordRejected

__all__ = ["BlobStore", "S3Blobs", "LocalBlobs", "check_key", "LOCAL_AUDIO_URL_PREFIX"]

T = TypeVar("T")

LOCAL_AUDIO_URL_PREFIX = "/api/v1/audio/"


def check_key(key: str) -> str:
    """``key`` if it is a relative, non-climbing object key; InvalidKey otherwise."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise InvalidKey(f"object key {key[:80]!r} is not allowed")
    return key


class BlobStore:
    component = "minio"
    embedded = False

    async def open(self) -> None: ...
    async def ping(self) -> None: ...
    async def put(self, key: str, data: bytes, content_type: str) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def delete_prefix(self, prefix: str) -> int: ...
    async def keys(self, prefix: str = "") -> list[str]: ...
    def presigned_url(self, key: str) -> str | None: ...
    def describe(self) -> str: ...
    async def aclose(self) -> None: ...

    async def apply(self, op: Mapping[str, Any], payload: bytes = b"") -> dict[str, int] | None:
        kind = op.get("op")
        if kind == "put_object":
            await self.put(check_key(op["key"]), payload, op.get("content_type", "application/octet-stream"))
            return None
        if kind == "delete_prefix":
            return {"audio_objects": await self.delete_prefix(check_key(op["prefix"].rstrip("/")) + "/")}
        raise RecordRejected(f"unknown operation {kind!r} for the object store")


class S3Blobs(BlobStore):
    def __init__(self, *, endpoint: str, access_key: str, secret_key: str, bucket: str, secure: bool = False,
                 region: str = "us-east-1", presign_ttl_s: int = 900, timeout_s: float = 5.0,
                 max_threads: int = 4) -> None:
        for scheme, is_secure in (("https://", True), ("http://", False)):
            if endpoint.startswith(scheme):
                endpoint, secure = endpoint[len(scheme):].rstrip("/"), is_secure
        self._endpoint, self.bucket = endpoint, bucket
        self._presign_ttl = timedelta(seconds=presign_ttl_s)
        self._http = http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                   retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0),
                                   maxsize=max_threads)
        self._client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                             secure=secure, region=region, http_client=http)
        self._limiter = trio.CapacityLimiter(max_threads)
        self._bucket_ready = False

    def describe(self) -> str:
        return f"s3 {self._endpoint}/{self.bucket}"

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendUnavailable(f"S3 unreachable: {exc}") from exc
        except S3Error as exc:
            if exc.code == "NoSuchBucket":
                self._bucket_ready = False  # removed behind our back, or a fresh in-memory server
                raise BackendUnavailable(f"S3 bucket {self.bucket!r} is gone: {exc.message}") from exc
            status = exc.response.status if exc.response is not None else 0
            if status >= 500 or status in (403, 408, 429):
                raise BackendUnavailable(f"S3 answered {status} {exc.code}: {exc.message}") from exc
            raise RecordRejected(f"S3 refused: {exc.code}: {exc.message}") from exc

    async def open(self) -> None:
        if self._bucket_ready:
            return

        def ensure() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica was quicker
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await self._call(ensure)
        self._bucket_ready = True

    async def ping(self) -> None:
        if not await self._call(lambda: self._client.bucket_exists(self.bucket)):
            self._bucket_ready = False
            raise BackendUnavailable(f"S3 bucket {self.bucket!r} does not exist")

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        await self._call(lambda: self._client.put_object(
            self.bucket, key, io.BytesIO(data), len(data), content_type=content_type))

    async def get(self, key: str) -> bytes | None:
        def run() -> bytes | None:
            try:
                response = self._client.get_object(self.bucket, key)
            except S3Error as exc:
                if exc.code == "NoSuchKey":
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return await self._call(run)

    async def keys(self, prefix: str = "") -> list[str]:
        return await self._call(lambda: [
            o.object_name for o in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)])

    async def delete_prefix(self, prefix: str) -> int:
        def run() -> int:
            names = [o.object_name for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)]
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(n) for n in names]))
            if errors:
                raise errors[0]
            return len(names)

        return await self._call(run)

    def presigned_url(self, key: str) -> str | None:
        return self._client.presigned_get_object(self.bucket, key, expires=self._presign_ttl)

    async def aclose(self) -> None:
        self._http.clear()


class LocalBlobs(BlobStore):
    """Objects as files under ``root``, each written atomically (a reader never sees half a file)."""

    embedded = True

    def __init__(self, root: str | Path, *, url_prefix: str = LOCAL_AUDIO_URL_PREFIX) -> None:
        self.root = Path(root)
        self._url_prefix = url_prefix
        self._limiter = trio.CapacityLimiter(2)

    def describe(self) -> str:
        return f"directory {self.root}"

    def path_of(self, key: str) -> Path:
        return self.root / check_key(key)

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except OSError as exc:
            raise BackendUnavailable(f"audio directory {self.root}: {exc}") from exc

    async def open(self) -> None:
        await self._call(lambda: self.root.mkdir(parents=True, exist_ok=True))

    async def ping(self) -> None:
        if not await trio.to_thread.run_sync(self.root.is_dir):
            raise BackendUnavailable(f"audio directory {self.root} is missing")

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        target = self.path_of(key)

        def run() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)

        await self._call(run)

    async def get(self, key: str) -> bytes | None:
        path = self.path_of(key)
        return await self._call(lambda: path.read_bytes() if path.is_file() else None)

    async def keys(self, prefix: str = "") -> list[str]:
        def run() -> list[str]:
            if not self.root.is_dir():
                return []
            found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
            return sorted(k for k in found if k.startswith(prefix) and not k.rsplit("/", 1)[-1].startswith("."))

        return await self._call(run)

    async def delete_prefix(self, prefix: str) -> int:
        folder = self.path_of(prefix.rstrip("/"))

        def run() -> int:
            if not folder.is_dir():
                return 0
            count = sum(1 for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder)
            return count

        return await self._call(run)

    def presigned_url(self, key: str) -> str | None:
        return self._url_prefix + check_key(key)

    async def aclose(self) -> None:
        return None
