"""``abstain predict``: offline predict-or-abstain decisions for a folder, an ``.npz`` or a split.

Torch-free (numpy, ONNX Runtime, Pillow, pyarrow for Parquet). Every input becomes one record
whose decision is the service's: the numeric core is :func:`abstain.decisions.decide_arrays`,
the same lines ``serving.decisions.decide`` runs, on the same graph outputs
(:class:`abstain.runtime.OnnxModel`) at the same calibrated operating point.

Memory is bounded by one batch: images are decoded ``batch_size`` at a time, each batch is run,
its records are written and the batch is dropped (only the file list is held whole). The output
is written to a temp file next to ``--out`` and renamed over it at the end
(:func:`abstain.io.atomic_writer`), so an interrupted run leaves no half-written file.

Record fields (:data:`FIELDS`): ``source`` (file path, or ``index`` in the array), ``decision``
(``predict``, ``abstain`` or ``error``), ``label`` (answered) or ``candidate`` (abstained: the
top class, for human review), ``class_index``, ``confidence`` (softmax response), ``selection``
(g), ``score``, ``score_value``, ``threshold``, ``operating_point``, ``true_label`` (when the
input has labels) and ``error`` (why a file could not be read).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from abstain.calibration.data_sources import IMAGE_SUFFIXES, image_to_pixels, open_dataset_split
from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME, resolve_version_dir
from abstain.decisions import decide_arrays
from abstain.io import atomic_writer
from abstain.operating_points import OperatingPoint, load_calibration, verify_graph
from abstain.runtime import OnnxModel, validate_pixels

PREDICT, ABSTAIN, ERROR = "predict", "abstain", "error"
#: Output columns, in order (CSV header, Parquet schema).
FIELDS = (
    "source",
    "index",
    "decision",
    "label",
    "candidate",
    "class_index",
    "confidence",
    "selection",
    "score",
    "score_value",
    "threshold",
    "operating_point",
    "true_label",
    "error",
)
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class UnreadableInputError(ValueError):
    """An input file could not be decoded (raised under ``--fail-fast``)."""


@dataclass
class Item:
    """One input of a batch: where it came from, its label if known, its pixels or why it has none."""

    source: str | None
    index: int
    true_label: int | None = None
    pixels: np.ndarray | None = None
    error: str | None = None


@dataclass
class Summary:
    """What a run decided. ``selective_risk`` and ``accuracy_answered`` need labels (else ``None``)."""

    out: Path
    operating_point: str
    inputs: int = 0
    errors: int = 0
    answered: int = 0
    labelled: int = 0
    answered_wrong: int = 0
    error_examples: list[str] = field(default_factory=list)

    @property
    def decided(self) -> int:
        return self.inputs - self.errors

    @property
    def coverage(self) -> float:
        """Answered / decided (unreadable inputs are neither)."""
        return self.answered / self.decided if self.decided else math.nan

    @property
    def selective_risk(self) -> float | None:
        """Errors among the answered labelled inputs (Geifman & El-Yaniv 2017's selective risk)."""
        if not self.labelled:
            return None
        return self.answered_wrong / self.answered if self.answered else math.nan

    @property
    def accuracy_answered(self) -> float | None:
        risk = self.selective_risk
        return None if risk is None else 1.0 - risk


def output_format(path: Path) -> str:
    """``jsonl``, ``csv`` or ``parquet`` from ``path``'s extension; ``ValueError`` otherwise."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"--out {path}: the extension should be one of {', '.join(FORMATS)} (JSON Lines, CSV or Parquet)"
        )
    return fmt


def scan_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted, hidden entries skipped)."""
    root = Path(root)
    paths = [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found in it or below it")
    return paths


def folder_labels(root: Path, paths: Sequence[Path], class_names: Sequence[str]) -> list[int | None]:
    """Labels from class folders ``root/<class name>/...`` when every image sits in one, else none."""
    index = {name: i for i, name in enumerate(class_names)}
    labels = [
        index.get(p.relative_to(root).parts[0]) if len(p.relative_to(root).parts) > 1 else None for p in paths
    ]
    return labels if all(label is not None for label in labels) else [None] * len(paths)


def _folder_batches(root: Path, model: OnnxModel, batch_size: int) -> Iterator[list[Item]]:
    paths = scan_images(root)
    labels = folder_labels(root, paths, model.class_names)
    for start in range(0, len(paths), batch_size):
        batch: list[Item] = []
        for i in range(start, min(start + batch_size, len(paths))):
            item = Item(source=str(paths[i]), index=i, true_label=labels[i])
            try:
                item.pixels = image_to_pixels(paths[i], model.input_spec)
            except (ValueError, OSError, SyntaxError) as exc:  # what Pillow raises for a bad file
                item.error = str(exc)
            batch.append(item)
        yield batch


def load_unlabelled_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` float ``[N, C, H, W]`` in [0, 1] and the optional ``y`` ``[N]`` of an ``.npz``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise ValueError(
                    f"{path}: an .npz for abstain predict should hold an array 'x' "
                    f"[N, C, H, W] (and optionally 'y' [N]), but it holds {sorted(archive.files)}"
                )
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: x should be floating point in [0, 1], but got dtype {x.dtype}")
    if y is not None and (not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],)):
        raise ValueError(
            f"{path}: y should be {x.shape[0]} integer class indices, but got "
            f"dtype {y.dtype} shape {list(y.shape)}"
        )
    return x.astype(np.float32, copy=False), y


def _array_batches(
    x: np.ndarray, y: np.ndarray | None, model: OnnxModel, batch_size: int
) -> Iterator[list[Item]]:
    x = validate_pixels(x, model.input_spec)  # shape, NaN/Inf, range: the service's checks
    k = model.num_classes
    if y is not None and y.size and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels y should be class indices in [0, {k}), but got values outside it")
    for start in range(0, x.shape[0], batch_size):
        yield [
            Item(source=None, index=i, pixels=x[i], true_label=None if y is None else int(y[i]))
            for i in range(start, min(start + batch_size, x.shape[0]))
        ]


def open_input(
    model: OnnxModel,
    batch_size: int,
    *,
    data: Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    data_root: Path | None = None,
) -> tuple[int, Iterator[list[Item]]]:
    """(number of inputs, batches of :class:`Item`) for a folder, an ``.npz`` or a dataset split."""
    if (data is None) == (dataset is None):
        raise ValueError(
            "give exactly one input: INPUT (an image folder or an .npz file), or --dataset NAME --split SPLIT"
        )
    if batch_size < 1:
        raise ValueError(f"batch size should be at least 1, but got {batch_size}")
    if dataset is not None:
        source = open_dataset_split(dataset, split, model.input_spec, model.class_names, data_root)
        split_data = source.materialise()  # array datasets are in memory already
        return len(split_data), _array_batches(split_data.x, split_data.y, model, batch_size)
    path = Path(data)  # type: ignore[arg-type]
    if path.is_dir():
        n = len(scan_images(path))
        return n, _folder_batches(path, model, batch_size)
    if path.is_file() and path.suffix.lower() == ".npz":
        x, y = load_unlabelled_npz(path)
        return int(x.shape[0]), _array_batches(x, y, model, batch_size)
    raise ValueError(f"INPUT {path}: should be an image folder or an .npz file, and it is neither")


def decide_batch(model: OnnxModel, point: OperatingPoint, batch: list[Item]) -> list[dict[str, Any]]:
    """Records for one batch: readable items through the graph and ``decide_arrays``, others as errors."""
    good = [item for item in batch if item.error is None]
    records: dict[int, dict[str, Any]] = {}
    if good:
        x = validate_pixels(np.stack([item.pixels for item in good]), model.input_spec)
        out = model.run(x)
        d = decide_arrays(out.logits, out.selection, point)
        for j, item in enumerate(good):
            k = int(d.class_index[j])
            answered = bool(d.answered[j])
            records[item.index] = {
                "decision": PREDICT if answered else ABSTAIN,
                "label": model.class_names[k] if answered else None,
                "candidate": None if answered else model.class_names[k],
                "class_index": k,
                "confidence": float(d.confidence[j]),
                "selection": float(d.selection[j]),
                "score_value": float(d.score_value[j]),
            }
    rows = []
    for item in batch:
        row = {name: None for name in FIELDS}
        row.update(
            source=item.source,
            index=item.index,
            score=point.score,
            threshold=float(point.threshold),
            operating_point=point.name,
            true_label=None if item.true_label is None else model.class_names[item.true_label],
        )
        if item.error is not None:
            row.update(decision=ERROR, error=item.error)
        else:
            row.update(records[item.index])
        rows.append(row)
    return rows


class RecordWriter:
    """Writes record batches to an open binary handle as JSON Lines, CSV or Parquet (streamed)."""

    def __init__(self, handle: IO[bytes], fmt: str) -> None:
        self.handle, self.fmt = handle, fmt
        self._csv: Any = None
        self._text: Any = None
        self._parquet: Any = None
        if fmt in ("jsonl", "csv"):
            import io

            self._text = io.TextIOWrapper(handle, encoding="utf-8", newline="", write_through=True)
            if fmt == "csv":
                self._csv = csv.DictWriter(self._text, fieldnames=FIELDS)
                self._csv.writeheader()
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._schema = pa.schema(
                [
                    ("source", pa.string()),
                    ("index", pa.int64()),
                    ("decision", pa.string()),
                    ("label", pa.string()),
                    ("candidate", pa.string()),
                    ("class_index", pa.int64()),
                    ("confidence", pa.float64()),
                    ("selection", pa.float64()),
                    ("score", pa.string()),
                    ("score_value", pa.float64()),
                    ("threshold", pa.float64()),
                    ("operating_point", pa.string()),
                    ("true_label", pa.string()),
                    ("error", pa.string()),
                ]
            )
            self._pa = pa
            self._parquet = pq.ParquetWriter(handle, self._schema)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.fmt == "jsonl":
            for row in rows:
                self._text.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        elif self.fmt == "csv":
            self._csv.writerows(rows)
        else:
            self._parquet.write_table(self._pa.Table.from_pylist(rows, schema=self._schema))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._text is not None:
            self._text.flush()
            self._text.detach()  # the atomic writer owns and closes the handle


def run_predict(
    model_dir: Path,
    out: Path,
    *,
    data: Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    data_root: Path | None = None,
    operating_point: str | None = None,
    batch_size: int = 256,
    fail_fast: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Decide every input, write the records to ``out`` atomically, return the summary.

    Args:
        model_dir: ``models/<name>`` (latest version) or ``models/<name>/<version>``, calibrated.
        out: ``.jsonl``, ``.csv`` or ``.parquet``.
        operating_point: a name from calibration.json (default: its default).
        fail_fast: raise :class:`UnreadableInput` at the first unreadable file (nothing is written).
        progress: called as ``progress(done, total)`` after each batch.
    """
    fmt = output_format(out)
    version_dir = resolve_version_dir(Path(model_dir))
    graph = version_dir / MODEL_FILENAME
    calibration = load_calibration(version_dir / CALIBRATION_FILENAME)
    model = OnnxModel(graph)
    verify_graph(calibration, graph, model.sha256)
    try:
        point = calibration.operating_point(operating_point)
    except KeyError as exc:  # a user's typo: a one-line error, not a traceback
        raise ValueError(exc.args[0]) from None
    total, batches = open_input(
        model, batch_size, data=data, dataset=dataset, split=split, data_root=data_root
    )
    summary = Summary(out=Path(out), operating_point=point.name)
    with atomic_writer(Path(out), "wb") as handle:
        writer = RecordWriter(handle, fmt)
        try:
            for batch in batches:
                if fail_fast:
                    bad = next((item for item in batch if item.error is not None), None)
                    if bad is not None:
                        raise UnreadableInputError(f"{bad.error} (stopped by --fail-fast; nothing written)")
                rows = decide_batch(model, point, batch)
                writer.write(rows)
                _tally(summary, rows)
                if progress is not None:
                    progress(summary.inputs, total)
        finally:
            writer.close()
    return summary


def _tally(summary: Summary, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        summary.inputs += 1
        if row["decision"] == ERROR:
            summary.errors += 1
            if len(summary.error_examples) < 5:
                summary.error_examples.append(row["error"])
            continue
        if row["true_label"] is not None:
            summary.labelled += 1
        if row["decision"] == PREDICT:
            summary.answered += 1
            if row["true_label"] is not None and row["label"] != row["true_label"]:
                summary.answered_wrong += 1
