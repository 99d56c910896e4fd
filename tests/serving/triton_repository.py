"""Build a Triton model repository that serves an abstain model through the Python backend.

``python_backend_config`` turns the entry's ONNX ``config.pbtxt`` into one for
``backend: "python"`` (same name, batching, inputs and outputs), and
``write_python_backend_repository`` lays out ``<repo>/<name>/{config.pbtxt, labels.txt,
<v>/model.py, <v>/model.onnx}`` with ``tests/serving/triton_python_model/model.py``. Used by the Triton
tests and for running Triton from the ``nvidia-pytriton`` wheel, which lacks the ``onnxruntime_onnx`` backend.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from abstain.contract import LABELS_FILENAME, MODEL_FILENAME, TRITON_CONFIG_FILENAME

PYTHON_MODEL = Path(__file__).with_name("triton_python_model") / "model.py"


def python_backend_config(onnx_config: str) -> str:
    """Replace ``platform: "onnxruntime_onnx"`` by ``backend: "python"``; keep everything else."""
    if not re.search(r'platform:\s*"onnxruntime_onnx"', onnx_config):
        raise ValueError('config.pbtxt should declare platform: "onnxruntime_onnx" to be converted')
    return re.sub(r'platform:\s*"onnxruntime_onnx"', 'backend: "python"', onnx_config)


def write_python_backend_repository(version_dir: Path, repository: Path, graph: Path | None = None) -> Path:
    """Lay out a Python-backend Triton entry for ``version_dir`` (``models/<name>/<v>``) in ``repository``.

    ``graph`` overrides the ``model.onnx`` copied in (tests use it to serve a different graph).
    Returns the new entry directory ``repository/<name>``.
    """
    version_dir = Path(version_dir)
    entry_src = version_dir.parent
    config = entry_src / TRITON_CONFIG_FILENAME
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing; a model-repository entry needs a Triton config")
    entry = Path(repository) / entry_src.name
    target = entry / version_dir.name
    target.mkdir(parents=True, exist_ok=True)
    (entry / TRITON_CONFIG_FILENAME).write_text(python_backend_config(config.read_text()))
    labels = entry_src / LABELS_FILENAME
    if labels.is_file():  # the config's label_filename points at it; Triton refuses to load without it
        shutil.copyfile(labels, entry / LABELS_FILENAME)
    shutil.copyfile(PYTHON_MODEL, target / "model.py")
    shutil.copyfile(graph or version_dir / MODEL_FILENAME, target / MODEL_FILENAME)
    return entry
