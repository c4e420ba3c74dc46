"""The console of a training stage run by a quiet `causvid run`: its steps reach the driver (done/total, samples/s,
ETA) and nothing of Ray's own; when it fails, the tail of the failed worker's Ray log and where Ray's logs are."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import EMBEDDED_DEFAULT, load_config
from tests.world import FAST, write_world

BIN = Path(sys.executable).parent
OWN_LINE = re.compile(r"^\d\d:\d\d:\d\d [IWE] ")
STEP_LINE = re.compile(r" I ode_init +step (\d+)/3  \d+\.\d samples/s  ETA \d+:\d\d:\d\d  loss ")


def run_ode_init(root: Path, ray_tmp: Path, *overrides: str) -> tuple[int, str]:
    """`causvid run --from trajectories --until ode_init` on the tiny world; its exit status and console."""
    settings = [f"storage.root={root}", *FAST, "ode_init.eval_prompts=0", *overrides]
    write_world(load_config(EMBEDDED_DEFAULT, settings))  # where the CLI, without --config, looks
    args = ["run", "--from", "trajectories", "--until", "ode_init", *(arg for s in settings for arg in ("--set", s))]
    process = subprocess.Popen(
        [str(BIN / "causvid"), *args], env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, err


def test_a_training_stage_shows_its_steps_and_no_ray_lines(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    status, err = run_ode_init(tmp_path / "root", tmp_path_factory.mktemp("ray"))
    assert status == 0, err[-3000:]
    console = err.splitlines()
    training = console[next(i for i, line in enumerate(console) if " I ode_init        running -> " in line):]
    assert [int(m[1]) for line in training if (m := STEP_LINE.search(line))] == [1, 2, 3]
    assert [line for line in training if not OWN_LINE.match(line)] == []
    assert " I ode_init        done in " in training[-1]


def test_a_failed_training_stage_shows_its_worker_s_ray_log_under_the_root(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    status, err = run_ode_init(tmp_path / "root", tmp_path_factory.mktemp("ray"), "ode_init.batch_size=64", "ode_init.max_failures=0")
    assert status == 1
    [ray_logs] = re.findall(r"^Ray's logs of this run: (\S+)$", err, re.MULTILINE)
    assert Path(ray_logs).parent == tmp_path / "root" / "logs" and Path(ray_logs).is_symlink()
    assert (Path(ray_logs) / "raylet.out").is_file()
    [tail] = re.findall(rf"^--- last lines of {re.escape(ray_logs)}/worker-\S+\.err ---$(.*?)^Ray's logs", err, re.DOTALL | re.MULTILINE)
    assert "ValueError: ode_init: the dataset shard has fewer rows than one step's 64" in tail
