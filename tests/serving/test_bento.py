"""The service builds as a Bento (``bentofile.yaml``) and the built Bento serves.

The package's wheel is built first (``pip wheel --no-deps -w dist .``, as docs/serving.md
says), then a real ``bentoml build`` of the repository into a temporary ``BENTOML_HOME`` (no
lock, no network: ``PIP_NO_INDEX``/``UV_OFFLINE`` make any download attempt fail instead), then
a real ``bentoml serve <tag>`` of that Bento from outside the source tree, on a free 127.0.0.1 port.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serving.servers import REPO, free_port, service_env, stop, wait_ready

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.server

TAG = "abstain:test"


def bento_env(home: Path) -> dict[str, str]:
    env = service_env(home)  # no ABSTAIN_* settings leak in from the caller
    env.update({"PIP_NO_INDEX": "1", "UV_OFFLINE": "1"})
    return env


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build once: (BENTOML_HOME, the built Bento's directory)."""
    home = tmp_path_factory.mktemp("bentoml_home")
    wheel = REPO / bentofile_wheel()
    wheel.unlink(missing_ok=True)
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel.parent),
            str(REPO),
        ],
        cwd=REPO,
        env=bento_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert wheel.is_file(), f"pip wheel did not write {wheel}: {made.stdout}"
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' scratch folder
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(REPO), "--version", TAG.split(":")[1]],
        cwd=REPO,
        env=bento_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert f'Successfully built Bento(tag="{TAG}")' in built.stdout, built.stdout
    path = home / "bentos" / "abstain" / "test"
    assert (path / "bento.yaml").is_file()
    return home, path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bentofile_wheel() -> str:
    wheels = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]["wheels"]
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_bentofile_wheel_is_this_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert bentofile_wheel() == f"dist/abstain-{version}-py3-none-any.whl"


def test_bentofile_packages_are_the_serve_extra() -> None:
    config = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert config["service"] == "abstain.serving.service:Abstain"
    assert config["python"]["lock_packages"] is False
    expected = project["dependencies"] + project["optional-dependencies"]["serve"]
    assert config["python"]["packages"] == expected


def test_built_bento_holds_the_service_and_the_calibrated_graph(bento: tuple[Path, Path]) -> None:
    _, path = bento
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert info["service"] == "abstain.serving.service:Abstain"
    # the service is the packaged abstain.serving, byte for byte the source tree's
    wheel = path / "env" / "python" / "wheels" / Path(bentofile_wheel()).name
    with zipfile.ZipFile(wheel) as archive:
        for module in ("serving/service.py", "serving/config/settings.py", "abstain/contract.py"):
            packed = module if module.startswith("abstain/") else f"abstain/{module}"
            assert archive.read(packed) == (REPO / module).read_bytes(), module
    src = path / "src"
    versions = [d for d in (REPO / "models" / "digits").iterdir() if d.is_dir()]
    assert versions
    for version in versions:
        for name in ("model.onnx", "calibration.json"):
            packed = src / "models" / "digits" / version.name / name
            assert packed.is_file(), packed
            assert sha256(packed) == sha256(version / name), packed
    assert (src / "models" / "digits" / "labels.txt").is_file()
    # no loose source: a src/abstain/ would shadow the installed package
    loose = ("abstain", "serving", "calibration", "tests", "runs", "training", "export", ".venv")
    for absent in (*loose, "benchmarks", "deploy"):
        assert not (src / absent).exists(), absent
    assert not list(src.rglob("__pycache__"))
    requirements = (path / "env" / "python" / "requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "bentoml" in requirements
    for heavy in ("torch", "scikit-learn", "matplotlib", "scipy"):  # the serving side never needs them
        assert heavy not in requirements, heavy


def test_built_bento_serves(bento: tuple[Path, Path], tmp_path: Path) -> None:
    """``bentoml serve <tag>`` from outside the repository finds the Bento's own model."""
    home, path = bento
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", TAG, "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,  # not the repository: ./models must be the Bento's
            env=bento_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/readyz", process, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            metadata = client.get("/metadata").json()
            graph = path / "src" / "models" / "digits" / metadata["version"] / "model.onnx"
            assert metadata["graph_sha256"] == sha256(graph)
            pixels = [[[0.5] * 8 for _ in range(8)]]
            reply = client.post("/predict", json={"pixels": pixels})
        assert reply.status_code == 200, reply.text
        answer = reply.json()
        assert answer["model"] == "digits"
        assert [p["decision"] in ("predict", "abstain") for p in answer["predictions"]] == [True]
    finally:
        stop(process)
