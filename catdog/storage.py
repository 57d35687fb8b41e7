"""One storage layer for every URI the jobs touch: local paths and ``s3://bucket/prefix``.

Jobs never open files by their own path arithmetic; they ask a :class:`Storage` for bytes,
listings, atomic writes, or for the pyarrow filesystem that Ray Data and Ray Train need.
Credentials come from the standard AWS environment / credential chain, never from config.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(Exception):
    """A storage URI that cannot be used, phrased as one line naming the URI."""


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


@dataclass(frozen=True)
class Storage:
    """Filesystem factory bound to the ``storage`` section of a config (picklable)."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_config(cls, storage_config) -> Storage:
        return cls(endpoint_url=storage_config.endpoint_url, region=storage_config.region)

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path inside it for ``uri``."""
        if is_remote(uri):
            return self._s3(), uri[len("s3://") :].rstrip("/")
        if "://" in uri:
            raise StorageError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    def _s3(self) -> pafs.S3FileSystem:
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        kwargs: dict = {
            "region": region,
            "connect_timeout": 5,
            "request_timeout": 30,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        return pafs.S3FileSystem(**kwargs)

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.Directory

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as stream:
            return stream.read()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def list_files(self, uri: str, recursive: bool = True) -> list[pafs.FileInfo]:
        """Plain files under ``uri`` (paths are filesystem paths, not URIs)."""
        fs, path = self.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        return [info for info in infos if info.type == pafs.FileType.File]

    def makedirs(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        fs.create_dir(path, recursive=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """All-or-nothing write: the final name only ever holds a complete file.

        Locally this is a rename in the same folder; on S3 a PUT is already atomic per key,
        but we upload under a temporary key and move it so a multi-part upload that dies
        half way never leaves an object under the real name.
        """
        fs, path = self.resolve(uri)
        parent = posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path)
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{posixpath.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        if is_remote(uri):
            fs.move(tmp, path)
        else:
            os.replace(tmp, path)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def replace_dir(self, src_uri: str, dst_uri: str) -> None:
        """Move a finished folder into place, replacing what was there."""
        fs, src = self.resolve(src_uri)
        _, dst = self.resolve(dst_uri)
        if fs.get_file_info(dst).type != pafs.FileType.NotFound:
            fs.delete_dir(dst)
        fs.move(src, dst)

    def delete_dir(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)

    def uri_of(self, uri_like: str, fs_path: str) -> str:
        """Turn a filesystem path returned by :meth:`list_files` back into a URI."""
        return "s3://" + fs_path if is_remote(uri_like) else fs_path
