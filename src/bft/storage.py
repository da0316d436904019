"""Filesystem access for local paths and ``s3://`` URIs through fsspec (s3fs).

A :class:`Storage` is cheap to pickle (it carries the config, not a live client), so the
same object travels into Ray tasks and opens its own connection there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import uuid
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Iterator

import fsspec

from bft.config import StorageConfig

INPUT_SUFFIXES = {
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz"),
    "parquet": (".parquet",),
    "warc": (".warc", ".warc.gz", ".wet", ".wet.gz"),
}


# Local files are written under "<name>.tmp-<random>" and renamed when complete; a
# killed writer leaves such a file behind, which no listing reports.
TMP_MARKER = ".tmp-"


class StorageError(RuntimeError):
    """A permanent object-store problem (missing bucket, access denied): names the URI
    and the cause. Raised before any engine starts, so no GPU time is spent on a run
    that cannot read its input or write its output."""


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an error s3fs raised (it keeps botocore's as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        code = (getattr(seen, "response", None) or {}).get("Error", {}).get("Code")
        if code:
            return str(code)
        seen = seen.__cause__ or seen.__context__
    return None


def _cause(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "it does not exist"
    if isinstance(exc, PermissionError):
        return f"access denied ({exc})"
    return f"{type(exc).__name__}: {exc}"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and ``s3://`` alike."""
    return posixpath.join(base.rstrip("/"), *[p.strip("/") for p in parts])


def detect_format(path: str) -> str | None:
    lower = path.lower()
    for fmt, suffixes in INPUT_SUFFIXES.items():
        if lower.endswith(suffixes):
            return fmt
    return None


class Storage:
    """Opens, lists and writes files under local paths or object-store URIs."""

    def __init__(self, config: StorageConfig):
        self.config = config

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]

    @cached_property
    def _s3(self) -> fsspec.AbstractFileSystem:
        import s3fs

        # Retries with backoff for throttling/5xx come from botocore's adaptive mode.
        opts = self.config.fsspec_options()
        opts.setdefault("config_kwargs", {"retries": {"max_attempts": 10, "mode": "adaptive"}})
        return s3fs.S3FileSystem(**opts)

    @cached_property
    def _local(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("file")

    def fs(self, uri: str) -> fsspec.AbstractFileSystem:
        if uri.startswith("s3://") or uri.startswith("s3a://"):
            return self._s3
        if is_remote(uri):
            raise ValueError(f"{uri}: unsupported scheme (use a local path or s3://)")
        return self._local

    @staticmethod
    def fs_path(uri: str) -> str:
        """``uri`` as its filesystem (:meth:`fs`) names it: ``bucket/key`` for ``s3://``."""
        return Storage._path(uri)

    @staticmethod
    def _path(uri: str) -> str:
        if uri.startswith("s3a://"):
            return uri[len("s3a://"):]
        if uri.startswith("s3://"):
            return uri[len("s3://"):]
        if uri.startswith("file://"):
            return uri[len("file://"):]
        return uri

    @staticmethod
    def _uri(like: str, path: str) -> str:
        return f"s3://{path}" if is_remote(like) else path

    def open(self, uri: str, mode: str = "rb", **kwargs: Any) -> IO:
        return self.fs(uri).open(self._path(uri), mode, **kwargs)

    def exists(self, uri: str) -> bool:
        return self.fs(uri).exists(self._path(uri))

    def list_files(self, uri: str) -> list[str]:
        """All files below ``uri`` (recursively), sorted; empty when nothing is there.
        Half-written temporary files (see :meth:`write_bytes`) are left out."""
        fs = self.fs(uri)
        path = self._path(uri)
        try:
            if not fs.exists(path):
                bucket = path.split("/", 1)[0]
                if is_remote(uri) and not fs.exists(bucket):
                    raise StorageError(f"{uri}: bucket '{bucket}' does not exist or these credentials "
                                       f"cannot see it")
                return []
            if not fs.isdir(path):
                return [uri]
            fs.invalidate_cache(path)
            return sorted(self._uri(uri, p) for p in fs.find(path) if TMP_MARKER not in p.rsplit("/", 1)[-1])
        except (PermissionError, ConnectionError) as exc:  # retries are spent by now
            raise StorageError(f"{uri}: cannot list it: {_cause(exc)}") from None

    def list_sizes(self, uri: str) -> dict[str, int]:
        """Like :meth:`list_files`, with each file's size, from one listing (progress and
        ``bft status`` poll a run with it: a changed size tells a rewritten file)."""
        fs = self.fs(uri)
        path = self._path(uri)
        try:
            if not fs.exists(path):
                return {}
            if not fs.isdir(path):
                return {uri: int(fs.info(path)["size"])}
            fs.invalidate_cache(path)
            return {self._uri(uri, p): int(info.get("size") or 0)
                    for p, info in sorted(fs.find(path, detail=True).items())
                    if TMP_MARKER not in p.rsplit("/", 1)[-1]}
        except (PermissionError, ConnectionError) as exc:
            raise StorageError(f"{uri}: cannot list it: {_cause(exc)}") from None

    def read_json_files(self, uri: str) -> list[Any]:
        """The JSON files below ``uri``, parsed; one that is unreadable (being replaced,
        cut short) is left out: the records kept this way are each written whole."""
        found = []
        for file in self.list_files(uri):
            if file.endswith(".json"):
                try:
                    found.append(json.loads(self.read_bytes(file)))
                except (ValueError, OSError):
                    continue
        return found

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri, "rb") as fh:
            return fh.read()

    def read_if_exists(self, uri: str) -> bytes | None:
        """The file's bytes, or ``None`` when there is none (asked of the store itself,
        not of a listing cached earlier in this process)."""
        fs = self.fs(uri)
        path = self._path(uri)
        fs.invalidate_cache(path)
        try:
            with fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a file so that readers never see it half-written.

        Local files are written under a temporary name and renamed; an S3 object only
        becomes visible once its upload completes, so it is written in place.
        """
        fs = self.fs(uri)
        path = self._path(uri)
        if is_remote(uri):
            with fs.open(path, "wb") as fh:
                fh.write(data)
            return
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)

    # --- conditional writes (the run lease, lease.py) ---------------------------------
    # S3 gives them natively (If-None-Match / If-Match on PUT); local files get them from
    # O_EXCL and an flock held around read-compare-write, which covers drivers on one
    # machine (a local output folder is not shared further).

    def create_new(self, uri: str, data: bytes) -> bool:
        """Write ``uri`` only if it does not exist; False when it does."""
        fs, path = self.fs(uri), self._path(uri)
        if is_remote(uri):
            try:
                fs.pipe_file(path, data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                # 412 PreconditionFailed, or 409 ConditionalRequestConflict when another
                # conditional write to the key is in flight: either way it was not ours.
                if _s3_error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        # Written whole under another name, then linked into place (link fails if the name
        # exists): the file never exists empty or half-written, even if this process dies.
        tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex}"
        Path(tmp).write_bytes(data)
        try:
            with self._local_lock(path):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                except OSError:  # a filesystem without hard links: exclusive create, then write
                    try:
                        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        return False
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
        finally:
            os.unlink(tmp)
        return True

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """The file's bytes and a version token for :meth:`replace_if`; None when missing."""
        fs, path = self.fs(uri), self._path(uri)
        if not is_remote(uri):
            with self._local_lock(path):
                try:
                    data = Path(path).read_bytes()
                except FileNotFoundError:
                    return None
            return data, hashlib.sha256(data).hexdigest()
        for _ in range(5):  # the object may change between the two calls: read until stable
            fs.invalidate_cache(path)
            try:
                before = fs.info(path)["ETag"]
                data = fs.cat_file(path)
                if fs.info(path)["ETag"] == before:
                    return data, before
            except FileNotFoundError:
                return None
        raise StorageError(f"{uri}: changes faster than it can be read")

    def replace_if(self, uri: str, data: bytes, version: str) -> str | None:
        """Overwrite ``uri`` if it is still at ``version``; its new version, or None when
        someone else changed (or removed) it first."""
        fs, path = self.fs(uri), self._path(uri)
        if not is_remote(uri):
            with self._local_lock(path):
                try:
                    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != version:
                        return None
                except FileNotFoundError:
                    return None
                self.write_bytes(uri, data)
            return hashlib.sha256(data).hexdigest()
        try:
            fs.pipe_file(path, data, IfMatch=version)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or "condition" in str(exc).lower():
                return None
            raise
        found = self.read_versioned(uri)
        return found[1] if found is not None and found[0] == data else None

    @staticmethod
    @contextlib.contextmanager
    def _local_lock(path: str) -> Iterator[None]:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove(self, uris: list[str], missing_ok: bool = False) -> None:
        for uri in uris:
            try:
                self.fs(uri).rm(self._path(uri))
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def check_writable(self, uri: str) -> None:
        """Fail early (before any model starts) when the output location is unusable."""
        probe = join(uri, f".bft-write-check-{uuid.uuid4().hex}")
        try:
            self.write_bytes(probe, b"ok")
            self.remove([probe])
        except OSError as exc:  # FileNotFoundError, PermissionError, connection errors
            raise StorageError(f"{uri}: cannot write there: {_cause(exc)}") from None
