"""``abstain serve --backend triton --triton-model NAME-selective``: Triton decides, the service fronts.

When Triton serves a selective entry (``abstain export-selective``), its graph returns
``accept`` bool ``[N, P]`` for the calibration's P operating points, and the service takes the
decision from it instead of comparing scores itself. With it comes ``scores`` float64 ``[N, P]``,
the numbers ``accept`` compared with the thresholds: the service reports them as each answer's
``score_value`` (``abstain.decisions.decide_arrays`` with ``score_value=`` and ``answered=``), so
a ``score_value`` is always on its ``threshold``'s scale — a logit for a ``selection`` point on a
graph with ``selection_logit`` — and ``score_value >= threshold`` iff answered. The
graph's ``selection_logit`` is fetched too when the calibrated graph has it
(:meth:`TritonBackend.verify` sets :attr:`TritonBackend.selection_logit`). Before the service
may front the entry, the start-up check here proves three things, each with a message saying
how to fix it:

1. the local selective graph (``<repository>/<triton model>/<version>/model.onnx``) was built
   from the calibration the service holds: its ``abstain.selective`` metadata records the
   sha256 of this ``calibration.json`` and of the calibrated base graph;
2. its operating points are the calibration's, in the same order (``accept``'s columns);
3. Triton serves that graph: on a fixed probe batch Triton's ``accept`` equals the local
   selective graph's and its ``scores`` agree with them, and its logits/selection the calibrated
   graph's (:meth:`TritonBackend.verify`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abstain.contract import (
    ACCEPT_NAME,
    CALIBRATION_FILENAME,
    INPUT_NAME,
    LOGITS_NAME,
    META_SELECTIVE,
    MODEL_FILENAME,
    SCORES_NAME,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
)
from abstain.io import sha256_file
from abstain.runtime import GraphOutputs, OnnxModel
from abstain.serving.triton.backend import DEFAULT_TIMEOUT_S, PROBE_ATOL, TritonBackend, probe_batch


@dataclass(frozen=True)
class SelectiveOutputs(GraphOutputs):
    """The graph outputs plus Triton's decision ``accept`` bool ``[N, P]`` and the ``scores``
    float64 ``[N, P]`` it compared with the thresholds (columns in calibration order)."""

    accept: np.ndarray | None = None
    scores: np.ndarray | None = None


class TritonSelectiveBackend(TritonBackend):
    """:class:`TritonBackend` that also fetches ``accept`` and ``scores`` from a selective entry."""

    def infer(self, x: np.ndarray) -> SelectiveOutputs:
        client = self._client()
        triton = self._local.module
        inp = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        names = [LOGITS_NAME, SELECTION_NAME, ACCEPT_NAME, SCORES_NAME]
        if self.selection_logit:  # set by verify() from the calibrated graph
            names.append(SELECTION_LOGIT_NAME)
        result = client.infer(
            self.model_name,
            [inp],
            model_version=self.model_version,
            outputs=[triton.InferRequestedOutput(n) for n in names],
            **self._call_timeout(),
        )
        return SelectiveOutputs(
            logits=result.as_numpy(LOGITS_NAME),
            selection=result.as_numpy(SELECTION_NAME).reshape(-1),
            selection_logit=(
                result.as_numpy(SELECTION_LOGIT_NAME).reshape(-1) if self.selection_logit else None
            ),
            accept=result.as_numpy(ACCEPT_NAME),
            scores=result.as_numpy(SCORES_NAME),
        )


def check_selective_entry(
    selective_graph: Path, calibrated_version_dir: Path, point_names: list[str]
) -> None:
    """Refuse (``ValueError``) unless ``selective_graph`` was built from this calibration and graph."""
    if not selective_graph.is_file():
        raise ValueError(
            f"{selective_graph} not found: the service checks the selective graph Triton serves against "
            "its calibration, so the entry must be in the served model repository too "
            f"(`abstain export-selective {calibrated_version_dir}`)"
        )
    import onnxruntime as ort

    meta = ort.InferenceSession(str(selective_graph), providers=["CPUExecutionProvider"]).get_modelmeta()
    raw = meta.custom_metadata_map.get(META_SELECTIVE)
    if raw is None:
        raise ValueError(f"{selective_graph} is not a selective graph (no {META_SELECTIVE} metadata)")
    info = json.loads(raw)
    calibration = calibrated_version_dir / CALIBRATION_FILENAME
    fixes = f"re-run `abstain export-selective {calibrated_version_dir} --force` and reload it in Triton"
    if info["calibration_sha256"] != sha256_file(calibration):
        raise ValueError(f"{selective_graph} was built from another calibration than {calibration}; {fixes}")
    if info["base_graph_sha256"] != sha256_file(calibrated_version_dir / MODEL_FILENAME):
        raise ValueError(f"{selective_graph} was built from another graph than the calibrated one; {fixes}")
    if [p["name"] for p in info["operating_points"]] != point_names:
        raise ValueError(f"{selective_graph}'s operating points differ from the calibration's; {fixes}")


def verify_selective_triton(
    url: str,
    calibrated_version_dir: Path,
    triton_model: str,
    point_names: list[str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """The start-up check of the module docstring; raises ``ValueError``."""
    version = calibrated_version_dir.name
    selective_graph = calibrated_version_dir.parents[1] / triton_model / version / MODEL_FILENAME
    check_selective_entry(selective_graph, calibrated_version_dir, point_names)
    reference = OnnxModel(calibrated_version_dir / MODEL_FILENAME, intra_op_threads=1, prefer_cuda=False)
    backend = TritonSelectiveBackend(url, triton_model, version, timeout_s=timeout_s)
    backend.verify(reference)  # ready, and logits/selection are the calibrated graph's
    import onnxruntime as ort

    local = ort.InferenceSession(str(selective_graph), providers=["CPUExecutionProvider"])
    x = probe_batch(reference.input_spec)
    expected, expected_scores = local.run([ACCEPT_NAME, SCORES_NAME], {INPUT_NAME: x})
    got = backend.infer(x)
    if (
        got.accept is None
        or got.accept.shape != expected.shape
        or not np.array_equal(got.accept, expected)
        or got.scores is None
        or got.scores.shape != expected_scores.shape
        or not np.allclose(got.scores, expected_scores, atol=PROBE_ATOL, rtol=0)
    ):
        raise ValueError(
            f"Triton model {triton_model!r} version {version} at {url} does not decide as {selective_graph} "
            "on a fixed probe batch: deploy that model.onnx to Triton"
        )
