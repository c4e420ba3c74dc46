import json
from pathlib import Path

import pytest

from infra.cli import main
from infra.config import ConfigError, PipelineConfig, load_config
from pipelines.workflow import plan
from tests.paths import REPO


def test_tiny_yaml_loads_and_overrides_apply() -> None:
    config = load_config(REPO / "configs" / "tiny.yaml", ["dmd.lr=1e-5", "dmd.teacher=causal", "dmd.ode_init=false"])
    assert config.model.preset == "tiny"
    assert config.dmd.lr == pytest.approx(1e-5)
    assert config.dmd.teacher == "causal"
    assert config.dmd.ode_init is False


def test_defaults_equal_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == PipelineConfig()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dmd.lrr=3"], "unknown config key 'dmd.lrr' (allowed here: batch_size, cache_shard, checkpoint_every, clean_context"),
        (["nosuch.key=1"], "unknown config key 'nosuch' (allowed here: causal_teacher, clips, dmd"),
        (["dmd.teacher=foo"], "config key 'dmd.teacher': must be one of 'bidirectional', 'causal' or 'none' (got 'foo')"),
        (["dmd.zero_stage=5"], "config key 'dmd.zero_stage': must be one of 0, 1, 2 or 3 (got 5)"),
        (["teacher.lr=-1"], "config key 'teacher.lr': Input should be greater than 0 (got -1)"),
        (["synthetic.num_videos=many"], "config key 'synthetic.num_videos': Input should be a valid integer"),
        (["dmd.lr"], "override 'dmd.lr' must look like section.key=value"),
        (["dmd.lr=1", "dmd.lr.x=1"], "override 'dmd.lr.x=1': lr is a value, not a section"),
    ],
)
def test_bad_values_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dmd: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_cli_reports_config_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--set", "dmd.lrr=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("causvid: error: unknown config key 'dmd.lrr'")
    assert len(err.splitlines()) == 1


def test_the_wan_cluster_config_loads_and_evaluates_only_what_it_names() -> None:
    from pipelines.workflow import STAGES

    config = load_config(REPO / "configs" / "wan1.3b.yaml")
    assert config.model.preset == "wan2.1-t2v-1.3b" and config.teacher.source and config.vae.source
    assert (config.dmd.zero_stage, config.dmd.num_workers, config.dmd.use_gpu, config.dmd.precision) == (3, 8, True, "bf16")
    assert config.evaluate.prompts_file and not config.evaluate.applications
    assert STAGES["evaluate"].inputs(config) == ("vae", "teacher", "ode_init", "dmd")
    assert STAGES["evaluate"].inputs(load_config(None)) == ("vae", "teacher", "causal_teacher", "ode_init", "dmd")


def test_commands_without_a_config_see_the_demo_s_outputs(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--set", f"storage.root={tmp_path / 'root'}", "--set", "synthetic.num_videos=2", "--set", "synthetic.seconds=1"]
    assert main(["--quiet", "stage", "synthetic", "--config", str(REPO / "configs" / "tiny.yaml"), *small]) == 0
    capsys.readouterr()
    assert main(["status", "--json", *small]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["synthetic"]["state"] == "done" and rows["clips"]["state"] == "missing"
    demo = plan(load_config(REPO / "configs" / "tiny.yaml", small[1::2]))
    assert {name: row["uri"] for name, row in rows.items()} == {name: demo.output_uri(name) for name in rows}


def test_the_embedded_default_is_package_data_of_configs() -> None:
    """One file, `configs/tiny.yaml`, found through importlib.resources as an installed package finds it."""
    from importlib import resources

    from infra.config import EMBEDDED_DEFAULT

    packaged = resources.files("configs").joinpath("tiny.yaml")
    assert Path(str(packaged)).resolve() == EMBEDDED_DEFAULT.resolve() == (REPO / "configs" / "tiny.yaml").resolve()
    assert load_config(Path(str(packaged))) == load_config(EMBEDDED_DEFAULT)
    assert sorted(p.relative_to(REPO) for p in REPO.rglob("tiny.yaml") if ".venv" not in p.parts) == [Path("configs/tiny.yaml")]


def test_an_installed_package_reads_the_embedded_default(tmp_path: Path) -> None:
    """Installed (not editable) into a folder of its own and run from elsewhere, `infra.config` finds the default."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "causvid-data", "__pycache__", "*.egg-info", "build", "tests"))
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    shown = subprocess.run(
        [sys.executable, "-c", "from infra.config import EMBEDDED_DEFAULT, load_config; "
         "print(EMBEDDED_DEFAULT); print(load_config(EMBEDDED_DEFAULT).model_dump_json())"],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    path, dumped = shown.stdout.splitlines()
    assert Path(path) == site / "configs" / "tiny.yaml"
    assert json.loads(dumped) == json.loads(load_config(REPO / "configs" / "tiny.yaml").model_dump_json())
