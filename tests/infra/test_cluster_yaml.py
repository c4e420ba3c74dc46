import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.paths import REPO


def test_ray_cluster_yaml_passes_rays_schema_check() -> None:
    config = prepare_config(yaml.safe_load((REPO / "ray_cluster.yaml").read_text()))
    validate_config(config)
    assert config["head_node_type"] == "head"
    assert config["available_node_types"]["gpu_8x_h100"]["node_config"]["InstanceType"] == "p5.48xlarge"
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "the dashboard and Jobs API must not listen publicly"
