"""The layout of docs/architecture.md, checked on the source, on a built wheel and on a real
interpreter.

* Every stage folder installs under the one import name ``abstain`` (pyproject.toml's
  package-dir); the wheel holds nothing outside ``abstain/`` and its dist-info, and a top-level
  ``import training`` fails outside the checkout.
* Each folder imports only what its row of the table allows (lazy imports included).
* ``abstain --help`` and the serving and calibration modules load without torch; a subcommand
  imports only its own stage.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

#: folder → import name (docs/architecture.md's table; pyproject.toml's package-dir)
STAGES = {
    "abstain": "abstain",
    "training": "abstain.training",
    "export": "abstain.export",
    "calibration": "abstain.calibration",
    "serving": "abstain.serving",
}

#: folder → top-level modules it must never import, and abstain.<stage> packages it must never import
HEAVY_TRAINING = {"torch", "torchvision"}
PLOTS_AND_FITS = {"sklearn", "scipy", "matplotlib"}
SERVING_LIBS = {"bentoml", "prometheus_client", "tritonclient", "starlette"}
#: batch engines: only calibration/ray_engine.py may import one (RAY_MODULES)
ENGINES = {"ray"}
FORBIDDEN = {
    "abstain": (
        HEAVY_TRAINING | SERVING_LIBS | ENGINES | {"matplotlib", "scipy", "onnx"},
        {"training", "export", "calibration", "serving"},
    ),
    "training": (
        SERVING_LIBS | ENGINES | {"onnxruntime", "matplotlib"},
        {"export", "calibration", "serving"},
    ),
    "export": (SERVING_LIBS - {"tritonclient"} | ENGINES | {"matplotlib"}, {"calibration", "serving"}),
    "calibration": (HEAVY_TRAINING | SERVING_LIBS | {"onnx"}, {"training", "export", "serving"}),
    "serving": (HEAVY_TRAINING | PLOTS_AND_FITS | ENGINES | {"onnx"}, {"training", "export", "calibration"}),
}
#: the calibration modules that may import Ray (lazily, inside functions: `abstain predict`
#: without --engine ray needs no Ray installed)
RAY_MODULES = {"calibration/ray_engine.py"}
#: the only core modules that may import an optional library, each lazily inside a function
CORE_OPTIONAL_IMPORTS = {
    "abstain/runtime.py": {"onnxruntime"},  # the graph runner that calibration and serving share
    "abstain/images.py": {"PIL"},
    "abstain/datasets.py": {"sklearn"},  # digits only
}


#: serving/'s rooms (sub-packages) → the other rooms (and ``metrics``) each may import; ``service.py``
#: and ``cli.py`` wire them and may import any (docs/architecture.md, "Inside serving/")
SERVING_ROOMS: dict[str, set[str]] = {
    "config": set(),
    "store": {"config"},
    "inference": {"config"},
    "triton": {"config", "inference"},
    "http": {"config", "inference", "metrics", "store"},
}


def serving_imports(path: Path) -> set[str]:
    """The rooms of serving/ (and ``metrics``) that a file imports, typing-only imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["abstain", "serving"] and len(parts) > 2:
                found.add(parts[2])
    return found


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(top-level modules, abstain stages) imported anywhere in a Python file, lazy imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    top = {m.split(".")[0] for m in modules}
    stages = {m.split(".")[1] for m in modules if m.startswith("abstain.") and m.count(".") >= 1}
    return top, stages & set(STAGES)


def python_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files found in {folder}/"
    return files


def test_pyproject_maps_every_stage_folder_under_abstain() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in STAGES.items()}
    subpackages = [f"abstain.serving.{room}" for room in SERVING_ROOMS]
    assert sorted(setuptools["packages"]) == sorted([*STAGES.values(), *subpackages])
    for folder in STAGES:
        assert (ROOT / folder / "__init__.py").is_file(), folder


def test_serving_rooms_are_the_documented_ones() -> None:
    """Every sub-package of serving/ is a room of docs/architecture.md, and nothing else is a folder."""
    folders = {p.name for p in (ROOT / "serving").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(SERVING_ROOMS)
    for room in SERVING_ROOMS:
        assert (ROOT / "serving" / room / "__init__.py").is_file(), room
    top_modules = {p.stem for p in (ROOT / "serving").glob("*.py")}
    assert top_modules == {"__init__", "service", "cli", "metrics"}


@pytest.mark.parametrize("room", sorted(SERVING_ROOMS))
def test_serving_rooms_depend_only_downward(room: str) -> None:
    """Inside serving/: the request path → inference and store → core; the service module wires them."""
    offenders = {}
    for path in python_files(f"serving/{room}"):
        found = serving_imports(path)
        bad = sorted(found - SERVING_ROOMS[room] - {room})
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, f"serving/{room}/ may import only {sorted(SERVING_ROOMS[room])}: {offenders}"


def test_metrics_imports_no_room() -> None:
    assert serving_imports(ROOT / "serving" / "metrics.py") == set()


def test_only_the_ray_engine_imports_ray() -> None:
    """The predictor (calibration/selector.py) runs in a Ray actor without importing Ray."""
    importers = {
        str(path.relative_to(ROOT)) for path in python_files("calibration") if "ray" in imports(path)[0]
    }
    assert importers == RAY_MODULES


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_only_what_its_stage_may(folder: str) -> None:
    modules, stages = FORBIDDEN[folder]
    offenders = {}
    for path in python_files(folder):
        rel = str(path.relative_to(ROOT))
        top, used_stages = imports(path)
        allowed_optional = CORE_OPTIONAL_IMPORTS.get(rel, set())
        bad = sorted((top & modules) - allowed_optional)
        bad += sorted(f"abstain.{s}" for s in used_stages & stages)
        if folder == "abstain":
            optional = {"onnxruntime", "PIL", "sklearn"}
            bad += sorted((top & optional) - allowed_optional)
        if bad:
            offenders[rel] = bad
    # abstain/cli.py names each stage's command module (imported when that subcommand runs)
    offenders.pop("abstain/cli.py", None)
    assert not offenders, f"{folder}/ must not import these: {offenders}"


def test_no_module_imports_the_old_top_level_names() -> None:
    """``training``, ``export``, ``serving`` and ``calibration`` exist only as ``abstain.<stage>``."""
    offenders = []
    for folder in (*STAGES, "tests", "benchmarks"):
        for path in python_files(folder):
            top, _ = imports(path)
            if top & {"training", "export", "serving", "calibration"}:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_import_checker_sees_lazy_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import numpy\n\ndef f():\n    from torch import nn\n    import abstain.serving.service\n"
    )
    assert imports(sample) == ({"numpy", "torch", "abstain"}, {"serving"})


@pytest.mark.parametrize(
    "statement",
    [
        "import abstain.cli",
        "import abstain.risk_coverage, abstain.operating_points, abstain.datasets, abstain.runtime",
        "import abstain.serving.service, abstain.serving.cli, abstain.serving.inference.backends",
        "import abstain.calibration.calibrate, abstain.calibration.evaluate, abstain.calibration.cli",
    ],
)
def test_modules_load_without_torch(statement: str) -> None:
    code = f"import sys; {statement}; print(sorted({{'torch', 'bentoml'}} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.strip().splitlines()[-1]
    expected = "['bentoml']" if "serving.service" in statement else "[]"
    assert loaded == expected, f"{statement!r} imported {loaded}"


@pytest.mark.parametrize(
    ("argv", "stage"),
    [
        (["serve", "--help"], "serving"),
        (["calibrate", "--help"], "calibration"),
        (["train", "--help"], "training"),
        (["export", "--help"], "export"),
    ],
)
def test_a_subcommand_imports_only_its_own_stage(argv: list[str], stage: str) -> None:
    code = (
        "import sys, abstain.cli as cli\n"
        f"sys.argv = ['abstain', *{argv!r}]\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('abstain.') and m.count('.')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = set(eval(result.stdout.strip().splitlines()[-1])) & set(STAGES)  # a printed list of names
    assert loaded == {stage}


def test_cli_help_lists_every_stage_and_version_names_the_code_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "abstain", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in ("train", "export", "calibrate", "evaluate", "serve"):
        assert command in result.stdout
    from abstain import __version__
    from abstain.version import code_version

    version = subprocess.run(
        [sys.executable, "-m", "abstain", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"abstain {__version__} (code version {code_version()})"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from the source tree as pip builds it for `pip install .`."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("abstain-*.whl")
    return path


def test_wheel_installs_nothing_outside_abstain(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    (dist_info,) = [t for t in tops if t.endswith(".dist-info")]
    assert tops == {"abstain", dist_info}
    for folder, name in STAGES.items():
        init = name.replace(".", "/") + "/__init__.py"
        assert init in names, init
        assert zipfile.ZipFile(wheel).read(init) == (ROOT / folder / "__init__.py").read_bytes()
    assert "abstain/serving/triton/decision_counter/model.py" in names
    # test support stays in tests/: the Python-backend stand-in for Triton's ONNX Runtime backend
    assert not [n for n in names if "triton_python_model" in n or "triton_repository" in n]


def test_old_top_level_names_do_not_import_outside_the_checkout(tmp_path: Path) -> None:
    """In this environment (the project installed, editable or not), run from elsewhere."""
    code = (
        "import importlib.util as u\n"
        "print([n for n in ('training', 'export', 'serving', 'calibration') if u.find_spec(n)], "
        "bool(u.find_spec('abstain.training')), bool(u.find_spec('abstain.serving')))"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no PYTHONPATH pointing into the checkout
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True True"


def test_ruff_is_clean() -> None:
    """The lint configuration in pyproject.toml holds for the whole tree (ruff is in the dev extra)."""
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    """``ruff format --check`` holds for the whole tree (the formatter's settings: pyproject.toml)."""
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
