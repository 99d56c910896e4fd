"""deploy/ray: the RayJob runs a command line `abstain predict` accepts, on the image its
Dockerfile builds, with the Ray version that image and the `ray` extra have. (KubeRay's CRD
schema ships in no package installed here, so the manifest is checked for what it refers to,
not against the CRD's OpenAPI schema.)"""

from __future__ import annotations

import re
import shlex

import typer
import yaml
from deploy_helpers import DEPLOY, REPO

from abstain.cli import app

RAY = DEPLOY / "ray"


def rayjob() -> dict:
    return yaml.safe_load((RAY / "rayjob.yaml").read_text())


def containers(job: dict) -> list[dict]:
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_entrypoint_is_a_command_line_abstain_predict_accepts() -> None:
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["abstain", "predict"]
    group = typer.main.get_command(app)
    predict = group.get_command(
        group.make_context("abstain", ["predict", "--help"], resilient_parsing=True), "predict"
    )
    ctx = predict.make_context("predict", argv[2:])  # raises on an unknown option or a bad value
    assert (ctx.params["engine"], ctx.params["address"]) == ("ray", "auto")
    # the image copies models/ to /models (deploy/ray/Dockerfile)
    assert (REPO / ctx.params["model_dir"].relative_to("/")).is_dir()


def test_the_workers_have_the_cpus_the_actors_ask_for() -> None:
    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    actors = int(argv[argv.index("--concurrency") + 1])
    per_actor = float(argv[argv.index("--cpus-per-actor") + 1])
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    cpus = sum(
        g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        for g in groups
    )
    # each worker also runs read and write tasks (calibration/ray_engine.py: IO_TASK_CPUS)
    assert cpus >= actors * per_actor + len(groups) * 0.25


def test_the_image_is_what_deploy_ray_dockerfile_builds_with_the_ray_of_the_extra() -> None:
    dockerfile = (RAY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", dockerfile, re.M)
    assert base, "deploy/ray/Dockerfile should build on Ray's own image"
    job = rayjob()
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == base.group(1)
    tag = re.search(r"docker build -f deploy/ray/Dockerfile -t (\S+) \.", dockerfile)
    assert tag and {c["image"] for c in containers(job)} == {tag.group(1)}
    assert "pip install --no-cache-dir '.[ray]'" in dockerfile
    pyproject = (REPO / "pyproject.toml").read_text()
    minimum = re.search(r'"ray\[data\]>=(\d+)\.(\d+),<(\d+)\.(\d+)"', pyproject)
    assert minimum
    assert tuple(map(int, base.group(1).split(".")[:2])) >= (int(minimum.group(1)), int(minimum.group(2)))
    ignore = (RAY / "Dockerfile.dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", dockerfile, re.M):
        for name in source.split():
            assert f"!{name.rstrip('/')}/" in ignore or f"!{name}" in ignore, f"{name} is excluded"
