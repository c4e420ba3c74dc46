"""Training datasets over Parquet shards: every row once, in shard order, and a one-line error for an empty root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from infra import storage
from infra.shards import shard_dataset


def read_values(batch: dict[str, np.ndarray], scale: int = 1) -> dict[str, np.ndarray]:
    """The `value` column of each shard in the batch, times `scale`."""
    tables = [storage.read_parquet(str(uri)) for uri in batch["uri"]]
    return {"value": np.asarray(pa.concat_tables(tables)["value"].to_pylist()) * scale}


def test_every_row_arrives_once_in_shard_order_with_the_readers_arguments(ray_local: None, tmp_path: Path) -> None:
    for shard in range(5):
        values = list(range(shard * 3, shard * 3 + 3))
        storage.write_parquet(str(tmp_path / f"part-{shard:03d}.parquet"), pa.table({"value": values}))
    storage.write_manifest(str(tmp_path), {"stage": "test"})
    rows = [int(r["value"]) for r in shard_dataset(str(tmp_path), read_values, "test", scale=10).iter_rows()]
    assert rows == [10 * v for v in range(15)]


def test_a_root_without_shards_names_what_is_missing(tmp_path: Path) -> None:
    storage.write_manifest(str(tmp_path), {"stage": "latents"})
    with pytest.raises(FileNotFoundError) as err:
        shard_dataset(str(tmp_path), read_values, "latent")
    assert str(err.value) == f"{tmp_path} holds no latent shards"
