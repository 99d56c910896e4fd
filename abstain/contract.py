"""The artifact contract between stages: tensor names, file names, metadata keys, input spec.

Every stage (training, export, calibration, serving) takes these names from here and
nowhere else, so a rename is one edit. See ``DESIGN.md`` ("The artifact contract").

Model repository entry (Triton Inference Server's layout, usable by Triton as it is)::

    <repository>/<name>/config.pbtxt
    <repository>/<name>/labels.txt
    <repository>/<name>/<version>/model.onnx
    <repository>/<name>/<version>/calibration.json
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# --- ONNX graph -------------------------------------------------------------------------
#: The single graph input: raw pixels, float32 [N, C, H, W] in [0, 1].
INPUT_NAME = "pixels"
#: Prediction head f: float32 [N, K] unnormalised class scores.
LOGITS_NAME = "logits"
#: Selection head g: float32 [N], a probability in [0, 1] ("answer this one").
SELECTION_NAME = "selection"
OUTPUT_NAMES = (LOGITS_NAME, SELECTION_NAME)
#: Optional third output: g's logit z, float32 [N], with ``selection == sigmoid(z)``. In float32
#: sigmoid(z) rounds to exactly 1.0 beyond z ≈ 17, so the most confident inputs tie in
#: ``selection``; z keeps them apart. ``abstain export`` always writes it; graphs exported
#: before it existed lack it, and every stage works without it (``selection`` is then g itself).
SELECTION_LOGIT_NAME = "selection_logit"
OPTIONAL_OUTPUT_NAMES = (SELECTION_LOGIT_NAME,)

# --- files ------------------------------------------------------------------------------
CHECKPOINT_FILENAME = "checkpoint.pt"
METRICS_FILENAME = "metrics.jsonl"
MODEL_FILENAME = "model.onnx"
CALIBRATION_FILENAME = "calibration.json"
LABELS_FILENAME = "labels.txt"
TRITON_CONFIG_FILENAME = "config.pbtxt"
EVALUATION_FILENAME = "evaluation.json"

#: Name of the model that ships in ``models/`` (trained on scikit-learn's digits).
DEFAULT_MODEL_NAME = "digits"

# --- ONNX metadata_props keys (values are strings; JSON where structured) --------------
META_CLASS_NAMES = "abstain.class_names"  # JSON list[str]
META_INPUT_SPEC = "abstain.input_spec"  # JSON InputSpec.to_dict()
META_TRAINING = "abstain.training"  # JSON: loss, beta, target coverage, dataset, epochs, ...
META_CHECKPOINT_SHA256 = "abstain.checkpoint_sha256"
META_CODE_VERSION = "abstain.code_version"
#: Fingerprint of the *training* split (see abstain.datasets.fingerprint); calibration
#: refuses data with the same fingerprint.
META_TRAIN_DATA_FINGERPRINT = "abstain.train_data_fingerprint"
#: JSON dict of the checkpoint's test-split metrics (accuracy, risk_at_coverage, ...).
META_TEST_METRICS = "abstain.test_metrics"
#: A checkpoint's metrics that are not test metrics: ``abstain.<split>_metrics``
#: (``abstain.val_metrics`` for the per-epoch record of a run stopped before its test evaluation).
META_SPLIT_METRICS = "abstain.{split}_metrics"
#: JSON: how the graph was made (exporter, opset, precision, optimisation, tolerance, training code).
META_EXPORT = "abstain.export"
#: JSON: what `abstain import` wrapped (source file, its sha256, format, output used) — set only
#: on imported graphs, whose selection output is the softmax response (no selection head).
META_IMPORTED = "abstain.imported"

# --- selection scores (higher = more confident = answer first) ------------------------
SCORE_SELECTION = "selection"  # g, the selection head
SCORE_SOFTMAX_RESPONSE = "softmax_response"  # max softmax of the logits
SCORE_COMBINED = "combined"  # geometric mean sqrt(g * softmax_response)
# post-hoc scores of the softmax p alone (no selection head), for `abstain calibrate --scores`
SCORE_MARGIN = "margin"  # p_(1) - p_(2), the top-two gap
SCORE_GINI = "gini"  # sum_k p_k^2 = 1 - Gini impurity (DOCTOR, Granese et al., NeurIPS 2021)
#: Every score an operating point may threshold.
SCORE_NAMES = (SCORE_SELECTION, SCORE_SOFTMAX_RESPONSE, SCORE_COMBINED, SCORE_MARGIN, SCORE_GINI)
#: The scores `abstain calibrate` chooses among by default (lowest AURC), δ split over them.
#: The post-hoc ones are opt-in (`--scores`): each candidate costs every risk point a share of δ,
#: and on the CE models of issue 19 margin and Gini never beat the softmax response.
DEFAULT_CANDIDATE_SCORES = (SCORE_SELECTION, SCORE_SOFTMAX_RESPONSE, SCORE_COMBINED)
#: An operating point's ``score_scale`` (in its extra fields): what its threshold is compared
#: with. ``logit``: the ``selection`` score is g's logit z (graphs with ``selection_logit``);
#: ``probability``: a value in [0, 1] (every other score, and ``selection`` on older graphs).
#: A point without the field is ``probability`` (calibration files older than the field).
SCORE_SCALE_LOGIT = "logit"
SCORE_SCALE_PROBABILITY = "probability"

#: Coverages of the paper's risk-at-coverage table, as the string keys used in JSON.
TABLE_COVERAGES = ("1.0", "0.95", "0.9", "0.85", "0.8", "0.75", "0.7")

CALIBRATION_SCHEMA_VERSION = 1

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a safe model-repository entry name, else raise ``ValueError``.

    Valid: 1-64 characters, letters, digits, ``_``, ``.``, ``-``, not starting with ``.``/``-``/``_``
    (no path separators, no ``..``), because it becomes a directory name and a Triton model name.
    """
    if not isinstance(name, str) or not _MODEL_NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"model name should be 1-64 characters of letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit and without '..', but got {name!r}"
        )
    return name


@dataclass(frozen=True)
class InputSpec:
    """What the graph's single input expects: raw pixels float32 [N, C, H, W] in [0, 1].

    ``mean``/``std`` (per channel) are the normalisation *baked into the graph*; they are
    recorded so a reader knows what the graph does, not so a client applies them.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = field(default=(0.0,))
    std: tuple[float, ...] = field(default=(1.0,))

    def __post_init__(self) -> None:
        for attr in ("channels", "height", "width"):
            value = getattr(self, attr)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InputSpec.{attr} should be a positive int, but got {value!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"InputSpec mean/std should have one value per channel ({self.channels}), "
                f"but got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"InputSpec std should be positive, but got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)``."""
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data["dtype"] = "float32"
        data["range"] = [0.0, 1.0]
        data["layout"] = "NCHW"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        try:
            return cls(
                channels=int(data["channels"]),
                height=int(data["height"]),
                width=int(data["width"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"input spec should be a mapping with channels, height, width, mean, std; but got {data!r}"
            ) from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def read_labels(path: Path) -> list[str]:
    """Class names from a ``labels.txt`` (one per line, blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def version_dirs(model_dir: Path) -> list[int]:
    """The numeric version sub-directories of a model-repository entry, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version_dir(model_dir: Path) -> Path:
    """``<model_dir>/<highest version>``; ``FileNotFoundError`` naming the layout if none."""
    versions = version_dirs(model_dir)
    if not versions:
        raise FileNotFoundError(
            f"no model version found in {model_dir}: expected a model-repository entry "
            f"<name>/<version>/{MODEL_FILENAME} with <version> a positive integer"
        )
    return Path(model_dir) / str(versions[-1])


def resolve_version_dir(path: Path) -> Path:
    """Accept either an entry ``models/NAME`` (latest version) or a version ``models/NAME/3``."""
    path = Path(path)
    if (path / MODEL_FILENAME).is_file():
        return path
    if path.is_dir():
        return latest_version_dir(path)
    raise FileNotFoundError(
        f"{path} is not a model directory: expected models/<name> or models/<name>/<version> "
        f"containing {MODEL_FILENAME}"
    )


def default_repository() -> Path:
    """Where the embedded model repository lives.

    ``$ABSTAIN_MODEL_REPOSITORY`` if set, else ``./models`` if it exists, else the ``models/``
    folder of the source tree this package was installed from (editable installs).
    """
    import os

    env = os.environ.get("ABSTAIN_MODEL_REPOSITORY")
    if env:
        return Path(env)
    cwd_models = Path.cwd() / "models"
    if (cwd_models / DEFAULT_MODEL_NAME).is_dir():
        return cwd_models
    return Path(__file__).resolve().parents[1] / "models"


def class_names_json(names: Sequence[str]) -> str:
    return json.dumps(list(names))


# --- selective graph (`abstain export-selective`) ---------------------------------------
#: Outputs the selective graph adds to the base graph's (export/selective_graph.py).
CLASS_INDEX_NAME = "class_index"  # int64 [N], arg-max class
CONFIDENCE_NAME = "confidence"  # float64 [N], softmax response
SCORES_NAME = "scores"  # float64 [N, P], one column per operating point
ACCEPT_NAME = "accept"  # bool [N, P], scores >= thresholds
SELECTIVE_OUTPUT_NAMES = (CLASS_INDEX_NAME, CONFIDENCE_NAME, SCORES_NAME, ACCEPT_NAME)
#: JSON: operating points (name, score, threshold, targets) in column order, base graph and
#: calibration sha256 (export/selective_graph.py SelectiveInfo).
META_SELECTIVE = "abstain.selective"
#: Default entry name of a selective graph: ``<base name>-selective``.
SELECTIVE_SUFFIX = "-selective"
