"""The deployments file of `serve --ray`: read, checked, and refused in one line when wrong or when
the cluster cannot place it (without starting Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.server.ray_app import Deployments, _check_fits, load_deployments
from models.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ray-deployments.yaml"


def test_the_example_file_reads_and_turns_into_ray_options():
    deployments = load_deployments(str(EXAMPLE))
    backbone = deployments.backbone.options("backbone")
    assert backbone["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in backbone
    assert backbone["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    assert deployments.transcriber.options("transcriber")["num_replicas"] == 1
    assert deployments.speech == Deployments().speech  # left out: the default


def test_a_wrong_file_is_one_line(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("backbone:\n  num_gpu: 1\n")
    with pytest.raises(ConfigError, match="num_gpu"):
        load_deployments(str(bad))


def test_a_cluster_too_small_is_refused_before_ray_waits_forever():
    deployments = Deployments.model_validate({"backbone": {"num_gpus": 1}})
    with pytest.raises(ConfigError, match="1 GPUs and the Ray cluster has 0"):
        _check_fits(deployments, {"CPU": 16.0})
    _check_fits(Deployments(), {"CPU": 2.0})  # the defaults fit a 2-core laptop


def test_two_gateways_need_a_shared_database():
    pytest.importorskip("ray.serve")
    from agent.server.ray_app import build_app
    from models.profiles import load_profile

    deployments = Deployments.model_validate({"gateway": {"num_replicas": 2}})
    with pytest.raises(ConfigError, match="Postgres"):
        build_app(AgentConfig(), load_profile("tiny"), deployments, {})
