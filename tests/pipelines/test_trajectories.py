"""The trajectories stage: killed half-way and resumed, exact rows, states equal to a direct Euler solve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from infra import storage, tracking
from model.presets import get_preset
from model.streaming import teacher_sample
from model.weights import MODEL_FILE, load_model
from pipelines import shard_rows, trajectories
from pipelines.workflow import plan, run_stages
from tests.paths import REPO

pytestmark = pytest.mark.usefixtures("ray_local")


def start_stage(root: Path, overrides: tuple[str, ...]) -> subprocess.Popen:
    schema_defaults = root / "schema-defaults.yaml"  # the world's base: the field defaults, not the demo's file
    schema_defaults.write_text("{}\n")
    args = [sys.executable, "-m", "infra.cli", "-q", "stage", "trajectories", "--config", str(schema_defaults)]
    for item in (f"storage.root={root}", *overrides):
        args += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, Ray's raylet and its worker processes included (they leave the process group)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the stage and every process it started at once, as a lost machine would stop them."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


# One prompt per shard and a longer solve, so that the kill lands between shards.
KILL = ("trajectories.rows_per_shard=1", "trajectories.ode_steps=24")


def test_killed_run_resumes_exactly(world, world_root: Path, world_settings: dict) -> None:
    config = world(*KILL)
    tracking.configure(config)
    out = plan(config).output_uri("trajectories")
    process = start_stage(world_root, (*world_settings["overrides"], *KILL))
    deadline = time.time() + 240
    try:
        while not storage.list_files(out, ".parquet"):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no trajectory shard appeared"
            time.sleep(0.05)
    finally:
        kill_tree(process)
    survived = storage.list_files(out, ".parquet")
    assert 1 <= len(survived) < 8 and not storage.is_complete(out)

    uri = run_stages(config, ["trajectories"])["trajectories"]
    manifest = storage.read_manifest(uri)
    assert manifest["counts"] == {"rows": 8, "shards": 8, "shards_computed": 8 - len(survived), "shards_skipped": len(survived)}
    table = storage.read_parquet(storage.join(uri, trajectories.shard_name(0)))
    assert table.schema == trajectories.TRAJECTORY_SCHEMA
    rows = [storage.read_parquet(f).to_pydict() for f in storage.list_files(uri, ".parquet")]
    indices = sorted(i for r in rows for i in r["prompt_index"])
    assert indices == list(range(8))
    first = rows[0]
    assert first["teacher"][0] == plan(config).fingerprints["teacher"] and first["teacher_run"][0] == world_settings["teacher_run"]
    assert (first["solver"][0], first["ode_steps"][0], first["cfg_scale"][0], first["dtype"][0]) == ("euler", 24, 3.0, "float32")
    assert first["timesteps"][0] == [1000, 750, 500, 250] and first["shift"][0] == 3.0

    tracking.configure(config)
    run = mlflow.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["causvid.teacher_run_id"] == world_settings["teacher_run"]
    assert run.data.tags["causvid.prompts_source"] == plan(config).output_uri("latents")

    before = {f: os.path.getmtime(f) for f in storage.list_files(uri, ".parquet")}
    assert run_stages(config, ["trajectories"])["trajectories"] == uri
    assert {f: os.path.getmtime(f) for f in storage.list_files(uri, ".parquet")} == before
    assert plan(world(*KILL, "teacher.lr=1e-3")).fingerprints["trajectories"] != plan(config).fingerprints["trajectories"]


def test_states_match_a_direct_euler_solve(world) -> None:
    config = world()
    uri = run_stages(config, ["trajectories"])["trajectories"]
    row = storage.read_parquet(storage.join(uri, trajectories.shard_name(1))).slice(1, 1).to_pydict()
    arrays = shard_rows.decode_trajectories(row)
    preset = get_preset("tiny")
    teacher = load_model(storage.join(plan(config).output_uri("teacher"), MODEL_FILE))
    assert row["prompt_index"] == [3] and row["seed"] == [trajectories.noise_seed(0, 3)]
    noise = trajectories.prompt_noise(row["seed"][0], preset.latent_shape())[None]
    text = (torch.from_numpy(arrays["text_emb"]), torch.from_numpy(arrays["text_mask"]))
    direct = teacher_sample(
        teacher, text, noise, preset.schedule(), num_steps=6, guidance_scale=3.0, record_timesteps=(1000, 750, 500, 250)
    )
    stored = torch.from_numpy(arrays["states"])  # [1, S, F, C, h, w]
    torch.testing.assert_close(stored[:, 0], noise, rtol=0, atol=0)
    torch.testing.assert_close(stored, direct.states.transpose(0, 1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(arrays["x0"]), direct.x0, rtol=1e-4, atol=1e-4)
    assert (stored[0, 1] - stored[0, 3]).abs().mean() > 0.05
