"""deploy/Dockerfile and deploy/Dockerfile.cuda, checked statically (no docker engine here):
torch-free serving images that install the `serve` (CPU) or `serve-gpu` (CUDA) extra plus
tritonclient, copy what the package build needs, bake the model repository at /models and
start the BentoML service on 0.0.0.0."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO

import abstain.serving.cli

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11's tomllib")
#: image → (Dockerfile, the extras its pip install names, its base image)
IMAGES = {
    "cpu": (DEPLOY / "Dockerfile", ".[serve,triton-client]", "python:3.11-slim"),
    "cuda": (
        DEPLOY / "Dockerfile.cuda",
        ".[serve-gpu,triton-client]",
        "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04",
    ),
}


@pytest.fixture(params=sorted(IMAGES), autouse=True)
def image(request: pytest.FixtureRequest) -> str:
    """Every test below runs once per image; DOCKERFILE is the one under test."""
    global DOCKERFILE
    DOCKERFILE = IMAGES[request.param][0]
    return request.param


DOCKERFILE = IMAGES["cpu"][0]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    pairs = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _all(keyword: str) -> list[str]:
    return [rest for k, rest in _instructions() if k == keyword]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pip_install_arguments() -> list[str]:
    (run,) = [r for r in _all("RUN") if "pip install" in r]
    command = run.split("&&")[0]
    return shlex.split(command)[2:]


def test_base_image(image: str) -> None:
    assert _all("FROM") == [IMAGES[image][2]]


def test_installs_the_serve_extra_and_tritonclient_but_never_torch(pyproject: dict, image: str) -> None:
    args = _pip_install_arguments()
    assert args == [IMAGES[image][1]]
    extras = pyproject["project"]["optional-dependencies"]
    assert [r for r in extras["triton-client"] if r.startswith("tritonclient")]
    installed = " ".join(args)
    for forbidden in ("[train", ",train", "calibrate", "[all", "dev", "torch", "pytriton"):
        assert forbidden not in installed
    # and the serving extras themselves list none of the heavy offline stacks
    heavy = ("torch", "torchvision", "nvidia-pytriton", "scikit-learn", "scipy", "matplotlib")
    for extra in ("serve", "serve-gpu"):
        assert not [r for r in extras[extra] if r.startswith(heavy)], extra


def test_gpu_extra_is_serve_with_onnxruntime_gpu_instead_of_onnxruntime(pyproject: dict) -> None:
    extras = pyproject["project"]["optional-dependencies"]
    assert [r for r in extras["serve-gpu"] if r.startswith("onnxruntime-gpu")]
    assert not [r for r in extras["serve-gpu"] if re.match(r"onnxruntime\b(?!-)", r)]
    swapped = [r.replace("onnxruntime-gpu", "onnxruntime") for r in extras["serve-gpu"]]
    assert swapped == extras["serve"]


def test_the_build_fails_if_torch_is_pulled_in_anyway() -> None:
    (run,) = [r for r in _all("RUN") if "pip install" in r]
    assert "'torch', 'sklearn', 'scipy', 'matplotlib'" in run and "sys.exit(" in run


def test_copies_every_package_the_build_needs(pyproject: dict) -> None:
    copied = {shlex.split(c)[0] for c in _all("COPY")}
    packages = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert packages == {"abstain", "training", "export", "calibration", "serving"}
    assert packages <= copied
    assert {"pyproject.toml", pyproject["project"]["readme"], "models"} <= copied | set(
        " ".join(_all("COPY")).split()
    )


def test_dockerignore_lets_every_copied_path_through() -> None:
    patterns = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore").read_text().splitlines()
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert "*" in patterns  # an allow-list
    for copy in _all("COPY"):
        for source in shlex.split(copy)[:-1]:
            if source != "./":
                assert source in allowed, f"{source} is copied but excluded by Dockerfile.dockerignore"


def test_model_repository_is_baked_at_models_and_configured() -> None:
    assert "models /models" in _all("COPY")
    env = " ".join(_all("ENV"))
    assert "ABSTAIN_MODEL_REPOSITORY=/models" in env


def test_runs_the_bentoml_service_on_all_interfaces_as_non_root() -> None:
    entrypoint = json.loads(_all("ENTRYPOINT")[0])
    cmd = json.loads(_all("CMD")[-1])
    assert entrypoint[:4] == ["python", "-m", "bentoml", "serve"]
    # the same BentoML service `abstain serve` starts
    assert entrypoint[4] == abstain.serving.cli.SERVICE
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    port = int(cmd[cmd.index("--port") + 1])
    assert _all("EXPOSE") == [str(port)]
    (user,) = _all("USER")
    assert user not in ("root", "0")


def test_image_port_and_command_match_the_kubernetes_deployment() -> None:
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == json.loads(_all("CMD")[-1])
    assert container["ports"][0]["containerPort"] == int(_all("EXPOSE")[0])
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(_all("USER")[0])
