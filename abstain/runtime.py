"""ONNX Runtime inference over an exported graph: the one code path that calibration,
evaluation and the embedded serving backend share (numpy in, numpy out, no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abstain.contract import (
    INPUT_NAME,
    LOGITS_NAME,
    META_CLASS_NAMES,
    META_INPUT_SPEC,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
    InputSpec,
)
from abstain.io import sha256_bytes


@dataclass(frozen=True)
class GraphOutputs:
    """``logits`` float32 ``[N, K]``, ``selection`` float32 ``[N]`` and, when the graph has it,
    ``selection_logit`` float32 ``[N]`` (g's logit z; None for older graphs) for one batch."""

    logits: np.ndarray
    selection: np.ndarray
    selection_logit: np.ndarray | None = None

    def rows(self, start: int, stop: int) -> GraphOutputs:
        """Rows ``start:stop`` of every output."""
        z = None if self.selection_logit is None else self.selection_logit[start:stop]
        return GraphOutputs(self.logits[start:stop], self.selection[start:stop], z)

    @staticmethod
    def concat(parts: list[GraphOutputs]) -> GraphOutputs:
        """Batches stacked in order (``selection_logit`` kept only if every part has it)."""
        zs = [p.selection_logit for p in parts if p.selection_logit is not None]
        return GraphOutputs(
            logits=np.concatenate([p.logits for p in parts]),
            selection=np.concatenate([p.selection for p in parts]),
            selection_logit=np.concatenate(zs) if len(zs) == len(parts) else None,
        )


def available_providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA first when ONNX Runtime has it (GPU build on a GPU machine), CPU always last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    providers = ["CUDAExecutionProvider"] if prefer_cuda and "CUDAExecutionProvider" in have else []
    return [*providers, "CPUExecutionProvider"]


def validate_pixels(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Check a batch against the graph's input spec; return it as contiguous float32.

    Raises ``ValueError`` naming the problem and what is valid: wrong rank or shape,
    non-numeric dtype, NaN/Inf, values outside [0, 1].
    """
    x = np.asarray(x)
    expected = (spec.channels, spec.height, spec.width)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"input should have shape [N, {expected[0]}, {expected[1]}, {expected[2]}] "
            f"(raw pixels, NCHW), but got {list(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError("input batch is empty; send at least one image")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"input should be float pixels in [0, 1], but got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("input contains NaN or Inf; pixels should be finite values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"pixels should be in [0, 1], but got values in [{lo:g}, {hi:g}]")
    return x


class OnnxModel:
    """An exported graph loaded in ONNX Runtime, with its metadata and the sha256 of its bytes.

    The file is read once; the session is built from those bytes and :attr:`sha256` is their
    hash, so the hash always names the graph actually running — a file replaced on disk
    after loading (``abstain export --force``) cannot bind a calibration to the wrong graph.

    Args:
        source: ``model.onnx`` (a path), or the graph's bytes already read.
        intra_op_threads: ONNX Runtime intra-op threads; ``None``: ONNX Runtime's own default (one
            per physical core), right for one offline process. The service passes its own share
            (``ServeSettings.intra_op_threads``) so that workers do not oversubscribe the cores.
        prefer_cuda: use the CUDA provider when available.
        path: where ``source`` bytes came from, for messages (ignored when ``source`` is a path).
    """

    def __init__(
        self,
        source: Path | str | bytes,
        intra_op_threads: int | None = None,
        prefer_cuda: bool = True,
        *,
        path: Path | str | None = None,
    ) -> None:
        import onnxruntime as ort

        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            self.path = Path(path) if path is not None else Path("<bytes>")
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise FileNotFoundError(f"ONNX graph {self.path} does not exist")
            data = self.path.read_bytes()
        #: sha256 of exactly the bytes the session was built from
        self.sha256: str = sha256_bytes(data)
        options = ort.SessionOptions()
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                data, sess_options=options, providers=available_providers(prefer_cuda)
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"{self.path} is not a loadable ONNX graph: {exc}") from exc
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != [INPUT_NAME] or not {LOGITS_NAME, SELECTION_NAME} <= set(names_out):
            raise ValueError(
                f"{self.path} does not follow the abstain contract: expected input [{INPUT_NAME!r}] "
                f"and outputs {LOGITS_NAME!r}, {SELECTION_NAME!r}, but got inputs {names_in}, "
                f"outputs {names_out}"
            )
        #: the graph has the optional ``selection_logit`` output (see abstain.contract)
        self.has_selection_logit: bool = SELECTION_LOGIT_NAME in names_out
        self._outputs = [LOGITS_NAME, SELECTION_NAME] + (
            [SELECTION_LOGIT_NAME] if self.has_selection_logit else []
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        try:
            self.input_spec = InputSpec.from_dict(json.loads(meta[META_INPUT_SPEC]))
            self.class_names: list[str] = list(json.loads(meta[META_CLASS_NAMES]))
        except (KeyError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{self.path} lacks abstain metadata ({META_INPUT_SPEC}, {META_CLASS_NAMES}); "
                "export it with `abstain export`"
            ) from exc
        self.providers: list[str] = self.session.get_providers()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def run(self, x: np.ndarray) -> GraphOutputs:
        """One forward pass on a validated float32 batch ``[N, C, H, W]``."""
        logits, selection, *z = self.session.run(self._outputs, {INPUT_NAME: x})
        return GraphOutputs(
            logits=logits, selection=selection.reshape(-1), selection_logit=z[0].reshape(-1) if z else None
        )

    def run_batched(self, x: np.ndarray, batch_size: int = 256) -> GraphOutputs:
        """Validate, then run ``x`` in batches of ``batch_size``; outputs concatenated in order."""
        x = validate_pixels(x, self.input_spec)
        return GraphOutputs.concat(
            [self.run(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        )
