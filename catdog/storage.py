"""One storage layer for every URI the jobs touch: local paths and ``s3://bucket/prefix``.

Jobs never open files by their own path arithmetic; they ask a :class:`Storage` for bytes,
listings, all-or-nothing writes, or for the filesystem objects that Ray Data, Ray Train and pyarrow
need (pyarrow's ``S3FileSystem``; s3fs only to list S3 objects with their ETags, which pyarrow's
listing lacks).  S3 settings come from
``storage.endpoint_url`` / ``storage.region`` in the config, else from the standard AWS
environment (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_DEFAULT_REGION``).  Credentials come from the AWS credential chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), never from config,
and are never passed to, stored in or logged by catdog.

Every S3 request is bounded: 5 s to connect, 8 s without progress on an open connection, at most
3 attempts.  A wrong endpoint, a missing bucket or refused credentials surface as one
:class:`StorageError` line naming the URI, in seconds rather than minutes.

Reading an object is retried on top of that (:func:`read_with_retries`): S3 5xx and throttling,
timeouts, resets and an object that was listed but is gone get ``READ_ATTEMPTS`` tries with
exponential backoff.  What still fails raises :class:`ReadError`, which is never mistaken for
an undecodable image or for a bad ``init``.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

S3_CONNECT_TIMEOUT_S = 5
S3_REQUEST_TIMEOUT_S = 8  # no progress for this long on an open connection fails the attempt
S3_MAX_ATTEMPTS = 3
# Reads of one object, each with the client's own S3_MAX_ATTEMPTS; backoff doubles from READ_BACKOFF_S.
READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.25
# Every ReadError message contains this; Ray Data retries map tasks whose error matches it, and the
# driver finds the failed objects in a Ray error by it.
READ_FAILED = "read failed after"


class StorageError(Exception):
    """A storage URI that cannot be used, phrased as one line naming the URI."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or folder named by a URI does not exist (also a ``FileNotFoundError``)."""


class ReadError(StorageError):
    """An object that could not be read after every retry: a storage fault, not bad data."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def bucket_of(uri: str) -> str:
    return uri[len("s3://") :].split("/", 1)[0]


# pyarrow's S3 errors look like "When <doing X> ...: AWS Error <CODE> during <Op> operation: <text>".
_AWS_CODE = re.compile(r"AWS Error ([A-Z_]+)")
_ACCESS_CODES = {
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "EXPIRED_TOKEN",
    "MISSING_AUTHENTICATION_TOKEN",
}


def describe_error(uri: str, exc: BaseException, endpoint: str | None = None) -> str:
    """One line naming ``uri`` and what is wrong, from a pyarrow / OS error."""
    text = " ".join(str(exc).split())
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    code_match = _AWS_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    detail = text.split(" operation: ", 1)[-1] if code else text
    detail = detail.split("; Details:", 1)[0].strip()
    if not detail or detail == "No response body.":
        detail = code or type(exc).__name__
    if code in ("NETWORK_CONNECTION", "UNKNOWN") and re.search(r"connect|resolve|timed? ?out|curlCode", text, re.I):
        where = endpoint or "the default AWS endpoint"
        return (
            f"{uri}: cannot reach the S3 endpoint {where} ({detail}); "
            "check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    if code in _ACCESS_CODES or "AccessDenied" in text or "InvalidAccessKeyId" in text:
        return (
            f"{uri}: access denied by S3 ({detail}); check the AWS credentials "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or profile) and the bucket policy"
        )
    if code == "NO_SUCH_BUCKET" or re.search(
        r"Bucket '[^']*' not found|bucket does not exist|NoSuchBucket", text, re.I
    ):
        return f"{uri}: bucket '{bucket_of(uri)}' does not exist" if is_remote(uri) else f"{uri}: {detail}"
    if isinstance(exc, FileNotFoundError) or code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
        return f"{uri}: not found"
    return f"{uri}: {detail[:300]}"


def is_permanent(exc: BaseException) -> bool:
    """Errors that another try cannot fix: refused credentials, a missing bucket.  Everything
    else (5xx, SlowDown, timeouts, resets, a listed object that is gone) is worth retrying."""
    text = str(exc)
    code_match = _AWS_CODE.search(text)
    return (code_match is not None and code_match.group(1) in _ACCESS_CODES | {"NO_SUCH_BUCKET"}) or (
        "AccessDenied" in text or "NoSuchBucket" in text
    )


def read_with_retries(uri: str, read, endpoint: str | None = None, retry_missing: bool = True) -> bytes:
    """``read()`` (the bytes of ``uri``), retried with jittered exponential backoff on ``OSError``.

    After ``READ_ATTEMPTS`` tries, or one permanent error (refused credentials, missing bucket),
    raise :class:`ReadError`: one line that starts with ``uri``.  With ``retry_missing=False`` a
    missing object raises :class:`StorageNotFound` at once (a path the user named); listed objects
    that are gone are retried (eventual consistency) and then reported as unreadable."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except FileNotFoundError:
            if not retry_missing:
                raise StorageNotFound(f"{uri}: not found") from None
            failure: OSError | None = None
        except OSError as exc:
            failure = exc
        if attempt == READ_ATTEMPTS or (failure is not None and is_permanent(failure)):
            why = f"{uri}: listed but gone" if failure is None else describe_error(uri, failure, endpoint)
            raise ReadError(f"{why} ({READ_FAILED} {attempt} attempt(s))")
        time.sleep(READ_BACKOFF_S * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


# A ReadError's text starts a line or follows the exception's name ("catdog.storage.ReadError: ") in
# Ray's tracebacks; the path runs to the first ": ", so it may hold spaces ("s3://b/my cat.jpg").
_READ_FAILURE = re.compile(
    r"(?:^|Error: )((?:s3://|/)[^\n]*?): ([^\n]*?) \(" + READ_FAILED + r" (\d+) attempt\(s\)\)", re.MULTILINE
)


def _error_texts(exc: BaseException, seen: set[int]) -> Iterator[str]:
    """The text of an error and of everything it wraps (causes, a Ray Train worker's failures)."""
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    yield str(exc)
    for inner in (exc.__cause__, exc.__context__, *getattr(exc, "worker_failures", {}).values()):
        yield from _error_texts(inner, seen)


def read_failure_in(exc: BaseException) -> ReadError | None:
    """The :class:`ReadError` (one line naming every object) behind an error that Ray raised after
    a task or a Train worker failed reading, else None."""
    failures: dict[str, str] = {}
    for text in _error_texts(exc, set()):
        for uri, detail, _ in _READ_FAILURE.findall(text):
            failures.setdefault(uri, detail)
    if not failures:
        return None
    shown = "; ".join(f"{uri}: {detail}" for uri, detail in sorted(failures.items())[:10])
    more = f" and {len(failures) - 10} more" if len(failures) > 10 else ""
    return ReadError(
        f"could not read {len(failures)} object(s) despite retries: {shown}{more}; "
        "previous outputs are unchanged, rerun when the storage recovers"
    )


@dataclass(frozen=True)
class Storage:
    """Filesystem factory bound to the ``storage`` section of a config (picklable, holds no secrets)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage_config) -> Storage:
        return cls(endpoint_url=storage_config.endpoint_url, region=storage_config.region)

    # -- filesystem objects -------------------------------------------------------------------

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path inside it for ``uri``: what Ray Data's
        ``filesystem=`` and Ray Train's ``RunConfig(storage_path=..., storage_filesystem=...)`` take."""
        if is_remote(uri):
            return self._s3(), uri[len("s3://") :].rstrip("/")
        if "://" in uri:
            raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint in use: ``storage.endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    @property
    def s3_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def _s3(self) -> pafs.S3FileSystem:
        # The region is always passed: without it pyarrow asks the bucket (a request to AWS even
        # when the endpoint is elsewhere).  Credentials are left to the AWS credential chain.
        kwargs: dict = {
            "region": self.s3_region,
            "connect_timeout": S3_CONNECT_TIMEOUT_S,
            "request_timeout": S3_REQUEST_TIMEOUT_S,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        }
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            kwargs["endpoint_override"] = (host or scheme).rstrip("/")
            kwargs["scheme"] = scheme if host else "https"  # "http" for plain-HTTP endpoints (MinIO, moto)
        return pafs.S3FileSystem(**kwargs)

    def s3fs(self):
        """An ``s3fs.S3FileSystem`` (fsspec) with the same endpoint, region and time bounds: it lists
        objects with their ETags (pyarrow's listing has none), for incremental predict."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": self.s3_region},
            config_kwargs={
                "connect_timeout": S3_CONNECT_TIMEOUT_S,
                "read_timeout": S3_REQUEST_TIMEOUT_S,
                "retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            },
        )

    @contextmanager
    def errors(self, uri: str) -> Iterator[None]:
        """Turn pyarrow / OS errors into one-line :class:`StorageError` naming ``uri``."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageNotFound(f"{uri}: not found{self.why_missing(uri)}") from None
        except OSError as exc:
            raise StorageError(describe_error(uri, exc, self.endpoint if is_remote(uri) else None)) from None

    # -- reading --------------------------------------------------------------------------------

    def _type(self, uri: str) -> pafs.FileType:
        fs, path = self.resolve(uri)
        with self.errors(uri):
            return fs.get_file_info(path).type

    def exists(self, uri: str) -> bool:
        return self._type(uri) != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        return self._type(uri) == pafs.FileType.Directory

    def bucket_exists(self, uri: str) -> bool:
        """For ``s3://`` URIs: whether the bucket exists (True for local paths)."""
        if not is_remote(uri):
            return True
        fs, _ = self.resolve(uri)
        with self.errors(uri):
            return fs.get_file_info(bucket_of(uri)).type != pafs.FileType.NotFound

    def why_missing(self, uri: str) -> str:
        """A short reason to append to "not found" messages: names a missing bucket."""
        if is_remote(uri) and not self.bucket_exists(uri):
            return f" (bucket '{bucket_of(uri)}' does not exist)"
        return ""

    def read_bytes(self, uri: str) -> bytes:
        """The bytes of one object: retried (:func:`read_with_retries`); a missing one raises
        :class:`StorageNotFound`, one that cannot be read raises :class:`ReadError`."""
        fs, path = self.resolve(uri)

        def read() -> bytes:
            with fs.open_input_stream(path) as stream:
                return stream.read()

        try:
            return read_with_retries(uri, read, self.endpoint if is_remote(uri) else None, retry_missing=False)
        except StorageNotFound:
            raise StorageNotFound(f"{uri}: not found{self.why_missing(uri)}") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def list_files(self, uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
        """Plain files under ``uri`` (paths are filesystem paths, not URIs)."""
        fs, path = self.resolve(uri)
        with self.errors(uri):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        return [info for info in infos if info.type == pafs.FileType.File]

    def list_versions(self, uri: str) -> pa.Table:
        """Every plain file under ``uri`` as Arrow columns ``path`` (filesystem path), ``size`` and
        ``version``: the modification time in ns locally, the ETag on S3 (listing metadata only, no
        extra request per object).  pyarrow's S3 listing has no ETag; s3fs's has, so S3 lists through it."""
        fs, path = self.resolve(uri)
        if not is_remote(uri):
            infos = self.list_files(uri)
            return pa.table(
                {
                    "path": pa.array([info.path for info in infos], pa.string()),
                    "size": pa.array([info.size for info in infos], pa.int64()),
                    "version": pa.array([str(info.mtime_ns) for info in infos], pa.string()),
                }
            )
        s3 = self.s3fs()
        s3.invalidate_cache()  # fsspec shares one instance per settings: never answer from an old listing
        with self.errors(uri):
            found = s3.find(path, detail=True)
        objects = [info for info in found.values() if info.get("type") == "file"]
        return pa.table(
            {
                "path": pa.array([info["name"] for info in objects], pa.string()),
                "size": pa.array([info["size"] for info in objects], pa.int64()),
                "version": pa.array([str(info.get("ETag", "")).strip('"') for info in objects], pa.string()),
            }
        )

    def uri_of(self, uri_like: str, fs_path: str) -> str:
        """Turn a filesystem path returned by :meth:`list_files` back into a URI."""
        return "s3://" + fs_path if is_remote(uri_like) else fs_path

    # -- writing --------------------------------------------------------------------------------

    def check_bucket(self, uri: str) -> None:
        """Fail with one line unless the bucket of an ``s3://`` URI exists and answers (a wrong
        endpoint or refused credentials fail here too); nothing to check for local paths."""
        if is_remote(uri) and not self.bucket_exists(uri):
            raise StorageError(f"{uri}: bucket '{bucket_of(uri)}' does not exist")

    def makedirs(self, uri: str) -> None:
        """Create a local folder; on S3 (which has no folders) check that the bucket exists."""
        if is_remote(uri):
            self.check_bucket(uri)
            return
        fs, path = self.resolve(uri)
        with self.errors(uri):
            fs.create_dir(path, recursive=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """All-or-nothing write: the final name only ever holds a complete file.

        Locally this is a rename in the same folder.  On S3 the bytes are uploaded under a
        temporary key beside the final one and then copied into place (CopyObject, atomic per
        key), so an upload that dies half way never leaves an object under the real name.
        """
        fs, path = self.resolve(uri)
        parent = posixpath.dirname(path)
        tmp = f"{parent}/.{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
        with self.errors(uri):
            if not is_remote(uri):
                fs.create_dir(parent, recursive=True)
            try:
                with fs.open_output_stream(tmp) as stream:
                    stream.write(data)
                if is_remote(uri):
                    fs.move(tmp, path)  # S3: CopyObject + DeleteObject of the temporary key
                else:
                    os.replace(tmp, path)
            except BaseException:
                with suppress(Exception):  # best effort: never hide the original error
                    if fs.get_file_info(tmp).type == pafs.FileType.File:
                        fs.delete_file(tmp)
                raise

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def delete_file(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        with self.errors(uri):
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        with self.errors(uri):
            if fs.get_file_info(path).type == pafs.FileType.Directory:
                fs.delete_dir(path)

    def replace_dir(self, src_uri: str, dst_uri: str) -> None:
        """Put a finished folder in place of ``dst_uri``, replacing what was there; ``src_uri`` goes.

        Locally: delete the old folder, then one rename (a reader sees the old folder, nothing, or
        the new one, never a mix).  On S3 there is no rename: ``dst_uri`` is only touched once the
        whole of ``src_uri`` has been written; then every object is copied into place (each copy is
        atomic per key), objects of the old folder that the new one does not overwrite are deleted
        (a re-run never leaves duplicates), and ``src_uri`` is deleted.  A job killed during that
        copy can leave old and new objects side by side until the next successful run.
        """
        if not is_remote(src_uri):
            fs, src = self.resolve(src_uri)
            _, dst = self.resolve(dst_uri)
            with self.errors(dst_uri):
                if fs.get_file_info(dst).type != pafs.FileType.NotFound:
                    fs.delete_dir(dst)
                fs.move(src, dst)
            return
        if not is_remote(dst_uri):
            raise StorageError(f"{dst_uri}: cannot move {src_uri} between S3 and a local folder")
        self._s3_copy_dir(src_uri, dst_uri, delete_stale=True)
        self.delete_dir(src_uri)

    def move_dir(self, src_uri: str, dst_uri: str) -> None:
        """Move a folder to a new name that must not exist yet (``--restart`` moves a run aside).

        Locally one rename; on S3 a copy of every object, then the source is deleted.
        """
        if self.exists(dst_uri):
            raise StorageError(f"{dst_uri}: already exists; not moving {src_uri} over it")
        self.replace_dir(src_uri, dst_uri)

    def _s3_copy_dir(self, src_uri: str, dst_uri: str, delete_stale: bool) -> None:
        fs, src = self.resolve(src_uri)
        _, dst = self.resolve(dst_uri)
        with self.errors(src_uri):
            new = {
                info.path[len(src) :].lstrip("/")
                for info in fs.get_file_info(pafs.FileSelector(src, recursive=True))
                if info.type == pafs.FileType.File
            }
        if not new:
            raise StorageNotFound(f"{src_uri}: not found (nothing to move)")
        with self.errors(dst_uri):
            old = {
                info.path[len(dst) :].lstrip("/")
                for info in fs.get_file_info(pafs.FileSelector(dst, recursive=True, allow_not_found=True))
                if info.type == pafs.FileType.File
            }
            for relative in sorted(new):
                fs.copy_file(f"{src}/{relative}", f"{dst}/{relative}")
            if delete_stale:
                for relative in sorted(old - new):
                    fs.delete_file(f"{dst}/{relative}")
