"""One module for URIs: local paths and `s3://bucket/prefix`, through pyarrow's filesystems.

Ray Data reads and writes through the same `pyarrow.fs` objects, so a stage never cares where its
root is. Writes are atomic per file (a local temp file renamed into place; an S3 object appears only
once its upload completes), and an output folder counts only once its `_SUCCESS.json` manifest is
written, last.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from infra.config import StorageConfig
from infra.redact import redact

MANIFEST = "_SUCCESS.json"
STAGING_PREFIX = ".tmp-"


class IncompleteOutputError(FileNotFoundError):
    """An output folder without its manifest: a stage that has not finished, or never ran."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Absolute form of a URI, so that Ray workers with another working directory agree on it."""
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_s3(base) else str(Path(base, *parts))


S3_ATTEMPTS_ENV = "CAUSVID_S3_ATTEMPTS"
S3_ATTEMPTS = 10
S3_CONNECT_TIMEOUT_S = 5.0
S3_TIMEOUT_ENV = "CAUSVID_S3_TIMEOUT_S"
S3_REQUEST_TIMEOUT_S = 60.0
URI_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(uri: str) -> str:
    """`s3`, `file`, another scheme as written, or '' for a plain path."""
    match = URI_SCHEME.match(uri)
    return match["scheme"].lower() if match else ""


def apply_settings(settings: StorageConfig) -> None:
    """Make `storage.s3_endpoint_url` / `storage.s3_region` the process's S3 settings, before Ray starts,
    so that its workers (and submitted jobs, which are forwarded these variables) see them too."""
    if settings.s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    if settings.s3_region:
        os.environ["AWS_REGION"] = settings.s3_region


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_attempts() -> int:
    """Attempts per S3 request, with AWS's standard retry mode's backoff in between (`$CAUSVID_S3_ATTEMPTS`)."""
    return int(os.environ.get(S3_ATTEMPTS_ENV, S3_ATTEMPTS))


def s3_timeout() -> float:
    """Seconds a request waits for the store's answer before it counts as failed and is retried
    (`$CAUSVID_S3_TIMEOUT_S`): a store that stalls longer costs attempts, not the stage."""
    return float(os.environ.get(S3_TIMEOUT_ENV, S3_REQUEST_TIMEOUT_S))


def s3_options() -> dict[str, Any]:
    """Endpoint, region, attempts and timeout of the S3 store, from the standard AWS variables
    ($AWS_ENDPOINT_URL too) and ours."""
    endpoint = s3_endpoint()
    options: dict[str, Any] = {"region": s3_region(), "attempts": s3_attempts(), "request_timeout": s3_timeout()}
    if endpoint:
        scheme_, _, host = endpoint.partition("://")
        options.update(endpoint_override=host or scheme_, scheme=scheme_ if host else "https")
    return options


@lru_cache(maxsize=8)
def _s3_filesystem(options_key: str) -> pafs.S3FileSystem:
    options = json.loads(options_key)
    return pafs.S3FileSystem(
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.pop("attempts")),
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        **options,
    )


@lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str, attempts: int, timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    retries = Config(
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=timeout,
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=retries)


def s3_client(attempts: int | None = None) -> Any:
    """A boto3 S3 client with botocore's standard retry mode (exponential backoff with jitter)."""
    return _s3_client(s3_endpoint(), s3_region(), attempts or s3_attempts(), s3_timeout())


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it (pyarrow's convention: `bucket/key` for S3)."""
    if is_s3(uri):
        return _s3_filesystem(json.dumps(s3_options(), sort_keys=True)), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), normalize(uri)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so that readers see either nothing or all of it, never a prefix."""
    if is_s3(uri):
        upload(io.BytesIO(data), uri)
        return
    target = Path(normalize(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f"{STAGING_PREFIX}{uuid.uuid4().hex}-{target.name}"
    try:
        with open(staging, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def upload(stream: BinaryIO, uri: str) -> None:
    """Upload to S3 with retries; large objects go up in parts, and a failed multipart upload is aborted (s3transfer
    aborts it), so no pending parts are left to be billed and the object never appears half-written."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    s3_client().upload_fileobj(stream, bucket, key)


def upload_file(local_path: str | Path, uri: str) -> None:
    if is_s3(uri):
        with open(local_path, "rb") as stream:
            upload(stream, uri)
        return
    write_bytes(uri, Path(local_path).read_bytes())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, value: Any) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def write_parquet(uri: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes(uri, buffer.getvalue())


def read_parquet(uri: str) -> pa.Table:
    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under a folder URI (hidden and temporary ones left out), sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefix = "s3://" if is_s3(uri) else ""
    names = [
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File and not info.base_name.startswith((".", "_")) and info.base_name.endswith(suffix)
    ]
    return sorted(names)


def list_dirs(uri: str) -> list[str]:
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in infos if info.type == pafs.FileType.Directory)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def sweep_staging(output_uri: str) -> int:
    """Remove the staging files a killed writer left in a local output (S3 uploads leave none); returns how many."""
    if is_s3(output_uri):
        return 0
    folder = Path(normalize(output_uri))
    stale = [path for path in folder.rglob(f"{STAGING_PREFIX}*") if path.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def delete_tree(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def write_manifest(output_uri: str, manifest: dict[str, Any]) -> None:
    """Mark an output complete; called last, after every file of the output is in place. Secrets never land in it."""
    write_json(join(output_uri, MANIFEST), redact(manifest))


def read_manifest(output_uri: str) -> dict[str, Any]:
    """The manifest of a complete output; an output without one is refused."""
    uri = join(output_uri, MANIFEST)
    if not exists(uri):
        raise IncompleteOutputError(f"{output_uri} is not a complete stage output (no {MANIFEST}); run its stage first")
    return read_json(uri)


def is_complete(output_uri: str) -> bool:
    return exists(join(output_uri, MANIFEST))


def parquet_files(output_uri: str) -> list[str]:
    """The Parquet shards of a complete output, for Ray Data or pyarrow readers: exactly those its manifest
    lists under `files` (a shard an interrupted attempt left behind is never read); an output written by
    hand without that list gives the Parquet files in its folder."""
    manifest = read_manifest(output_uri)
    if "files" in manifest:
        return [join(output_uri, name) for name in manifest["files"]]
    return list_files(output_uri, ".parquet")
