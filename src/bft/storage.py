"""Filesystem access for local paths and ``s3://`` URIs through fsspec (s3fs).

A :class:`Storage` is cheap to pickle (it carries the config, not a live client), so the
same object travels into Ray tasks and opens its own connection there.
"""

from __future__ import annotations

import posixpath
import uuid
from functools import cached_property
from typing import IO, Any

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
