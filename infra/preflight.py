"""Checks of what a command will touch, before Ray or MLflow start: each failure is one line naming the fix."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from infra import storage
from infra.config import PipelineConfig
from infra.errors import UserError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json", ".ndjson", ".parquet")
MANIFEST_COLUMNS = ("uri", "caption")
PREFLIGHT_ATTEMPTS = 2


def preflight(config: PipelineConfig, stages: list[str]) -> None:
    """The storage root (a writable folder, or a reachable S3 bucket) and, when `clips` runs, its manifest."""
    storage.apply_settings(config.storage)
    check_root(config.storage.root)
    if "clips" in stages and config.clips.manifest:
        check_manifest(config.clips.manifest)


def check_root(root: str) -> None:
    if storage.is_s3(root):
        check_s3(root, "storage.root")
        return
    path = Path(storage.normalize(root))
    if path.exists() and not path.is_dir():
        raise UserError(f"storage.root {root!r} is a file: point storage.root at a folder, e.g. --set storage.root=causvid-data")
    probe = path / f".causvid-write-check-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"storage.root {root!r} is not writable ({err.strerror or type(err).__name__}): "
            "choose a folder you can write, e.g. --set storage.root=$HOME/causvid-data"
        ) from None


def check_s3(uri: str, what: str) -> None:
    """That the bucket of `uri` answers, with a short retry budget, so an unreachable endpoint fails in seconds."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = uri[len("s3://") :].split("/", 1)[0]
    endpoint = storage.s3_endpoint() or "AWS S3"
    try:
        storage.s3_client(attempts=PREFLIGHT_ATTEMPTS).head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        raise UserError(f"{what} {uri!r}: bucket {bucket!r} at {endpoint} answered {code}: check the bucket name and credentials") from None
    except BotoCoreError as err:
        raise UserError(
            f"{what} {uri!r}: cannot reach the S3 endpoint {endpoint} ({type(err).__name__}): "
            "check storage.s3_endpoint_url / $AWS_ENDPOINT_URL and the network"
        ) from None


def check_manifest(uri: str) -> None:
    """A manifest that exists, has a known format and the `uri` and `caption` columns (its header alone is read)."""
    if not uri.lower().endswith(MANIFEST_SUFFIXES):
        raise UserError(f"clips.manifest {uri!r}: expected a .csv, .jsonl or .parquet file with `uri` and `caption` columns")
    if storage.is_s3(uri):
        check_s3(uri, "clips.manifest")
    if not storage.exists(uri):
        raise UserError(f"clips.manifest {uri!r} does not exist: pass the path or s3:// URI of your `uri,caption` file")
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest_columns(uri)]
    if missing:
        raise UserError(
            f"clips.manifest {uri!r} lacks the column(s) {', '.join(missing)}: it needs `uri` and `caption` columns"
        )


def manifest_columns(uri: str) -> list[str]:
    lower = uri.lower()
    if lower.endswith(".parquet"):
        fs, path = storage.resolve(uri)
        return list(pq.read_schema(path, filesystem=fs).names)
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as stream:
        head = stream.read(1 << 16)
    if lower.endswith(".csv"):
        try:
            return list(pacsv.read_csv(io.BytesIO(head.split(b"\n", 1)[0] + b"\n")).column_names)
        except pa.ArrowInvalid:
            return []
    first = head.split(b"\n", 1)[0].strip()
    try:
        row = json.loads(first) if first else {}
    except json.JSONDecodeError:
        return []
    return list(row) if isinstance(row, dict) else []

