"""``abstain predict``: offline predict-or-abstain decisions for a folder, an ``.npz`` or a split.

The decisions are the service's own (:func:`abstain.decisions.decide_arrays` on the graph's
outputs from :class:`abstain.runtime.OnnxModel`, with the calibration bound to the graph by
its sha256), so a batch scored offline gets exactly the answers ``abstain serve`` would give.

Inputs stream in batches: an image folder is listed (recursively), then decoded
``batch_size`` files at a time, so memory is bounded by one batch, not by the folder. A file
that cannot be read becomes an error record (``decision: "error"`` and its reason) instead
of stopping the run, unless ``fail_fast`` is set.

Outputs, by the file's extension: JSON Lines (``.jsonl``), CSV (``.csv``) or Parquet
(``.parquet``, written by pyarrow). Every format has the columns of :data:`COLUMNS`; the file
is written next to its final name and renamed into place at the end (:mod:`abstain.io`), so
an interrupted run leaves no half-written output.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from abstain.calibration.data_sources import image_to_pixels, open_labelled_data
from abstain.decisions import Decisions, decide_arrays
from abstain.io import atomic_writer
from abstain.runtime import OnnxModel, validate_pixels

#: Suffixes of images an input folder may hold (PNG and JPEG are what the service accepts).
PREDICT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: What ``--out`` may end with.
OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
#: One record per input, in this column order (``None`` where a column does not apply).
COLUMNS: tuple[str, ...] = (
    "input",  # the image's path relative to the folder, or the row index
    "decision",  # predict | abstain | error
    "label",  # the predicted class name (decision == predict)
    "candidate",  # the arg-max class name of an abstention, for review
    "prediction_set",  # an abstention's conformal set (class names), when its point has sets
    "class_index",  # index of label or candidate
    "confidence",  # softmax response of class_index
    "score",  # the score the operating point thresholds
    "score_value",
    "threshold",
    "operating_point",
    "true_label",  # when the input has labels
    "correct",  # class_index == true label, when the input has labels
    "error",  # why the input could not be read (decision == error)
)
ERROR = "error"


@dataclass
class Batch:
    """One batch of inputs: ``ids`` name every input; ``x`` holds the readable ones.

    Attributes:
        ids: ``B`` input names (paths or indices), in order.
        x: float32 ``[b, C, H, W]`` pixels of the readable inputs (``b <= B``).
        readable: bool ``[B]``, which ids have a row in ``x``.
        errors: reason per unreadable id.
        y: int64 ``[b]`` labels of the readable inputs, or ``None``.
    """

    ids: list[str]
    x: np.ndarray
    readable: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    y: np.ndarray | None = None


def list_images(root: Path) -> list[Path]:
    """Every PNG/JPEG under ``root`` (recursive, hidden entries skipped), sorted for a stable order."""
    paths = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in PREDICT_IMAGE_SUFFIXES
        and not is_hidden(p.relative_to(root).parts)
    ]
    if not paths:
        raise ValueError(f"{root}: no images ({', '.join(PREDICT_IMAGE_SUFFIXES)}) in the folder or below it")
    return sorted(paths)


def is_hidden(relative_parts: Sequence[str]) -> bool:
    """A folder entry that listing skips: any part of its path below the folder starts with a dot."""
    return any(part.startswith(".") for part in relative_parts)


def in_class_folders(relative: Sequence[Sequence[str]], class_names: Sequence[str]) -> bool:
    """Every file (its path's parts below the folder) sits in a folder named after a class: an
    ImageFolder tree, whose folder names are the labels."""
    return all(len(parts) >= 2 and parts[0] in class_names for parts in relative)


def folder_labels(root: Path, paths: Sequence[Path], class_names: Sequence[str]) -> np.ndarray | None:
    """Labels when the folder is an ImageFolder tree (``root/<class name>/…``) of the graph's classes."""
    firsts = [p.relative_to(root).parts for p in paths]
    if not in_class_folders(firsts, class_names):
        return None
    index = {name: i for i, name in enumerate(class_names)}
    return np.asarray([index[parts[0]] for parts in firsts], dtype=np.int64)


def folder_batches(
    root: Path, model: OnnxModel, batch_size: int, fail_fast: bool
) -> tuple[int, Iterator[Batch]]:
    """An image folder, decoded ``batch_size`` files at a time; unreadable files become errors."""
    paths = list_images(root)
    labels = folder_labels(root, paths, model.class_names)
    spec = model.input_spec

    def batches() -> Iterator[Batch]:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            x = np.empty((len(chunk), *spec.shape), dtype=np.float32)
            readable = np.zeros(len(chunk), dtype=bool)
            errors: dict[int, str] = {}
            for i, path in enumerate(chunk):
                try:
                    x[int(readable.sum())] = image_to_pixels(path, spec)
                    readable[i] = True
                except ValueError as exc:
                    if fail_fast:
                        raise
                    errors[i] = str(exc)
            y = None if labels is None else labels[start : start + len(chunk)][readable]
            yield Batch(
                ids=[str(p.relative_to(root)) for p in chunk],
                x=validate_pixels(x[: int(readable.sum())], spec) if readable.any() else x[:0],
                readable=readable,
                errors=errors,
                y=y,
            )

    return len(paths), batches()


def labelled_batches(model: OnnxModel, batch_size: int, **source: Any) -> tuple[int, Iterator[Batch]]:
    """An ``.npz`` (``x``, optional ``y``) or a dataset split, as ``calibrate`` reads it."""
    data = source.get("data")
    if data is not None and Path(data).suffix == ".npz":
        x, y = load_npz_input(Path(data))
        x = validate_pixels(x, model.input_spec)
        if y is not None and y.size and (int(y.min()) < 0 or int(y.max()) >= model.num_classes):
            raise ValueError(
                f"{data}: labels y should be class indices in [0, {model.num_classes}), "
                f"but range over [{int(y.min())}, {int(y.max())}]"
            )
        n = x.shape[0]
        chunks = (
            (x[i : i + batch_size], None if y is None else y[i : i + batch_size], i)
            for i in range(0, n, batch_size)
        )
    else:
        labelled = open_labelled_data(model.input_spec, model.class_names, **source)
        n = len(labelled)
        starts = range(0, n, batch_size)
        chunks = (
            (xb, labelled.y[s : s + xb.shape[0]], s)
            for xb, s in zip(labelled.iter_batches(batch_size), starts, strict=True)
        )

    def batches() -> Iterator[Batch]:
        for xb, yb, start in chunks:
            yield Batch(
                ids=[str(start + i) for i in range(xb.shape[0])],
                x=xb,
                readable=np.ones(xb.shape[0], dtype=bool),
                y=yb,
            )

    return n, batches()


def load_npz_input(source: Path | IO[bytes], name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` float ``[N, C, H, W]`` in [0, 1] and, when present, integer ``y`` ``[N]``, from an
    ``.npz`` file (a path, or its bytes as a binary file object named ``name`` in errors)."""
    path = str(source) if name is None else name  # for messages
    try:
        archive = np.load(source, allow_pickle=False)
    except Exception as exc:  # BadZipFile, pickle refusal, truncated file...
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with array 'x' (and optionally 'y')")
    with archive:
        if "x" not in archive.files:
            raise ValueError(
                f"{path}: an .npz for abstain predict should hold 'x' [N, C, H, W] "
                f"(and optionally 'y' [N]), but it holds {sorted(archive.files)}"
            )
        x = archive["x"]
        y = archive["y"] if "y" in archive.files else None
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{path}: x should be floating point in [0, 1], but got dtype {x.dtype}")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
            raise ValueError(
                f"{path}: y should be {x.shape[0]} integer class indices, but got "
                f"dtype {y.dtype} and shape {list(y.shape)}"
            )
        y = y.astype(np.int64)
    return x.astype(np.float32, copy=False), y


def batch_records(batch: Batch, d: Decisions | None, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One record per id of ``batch`` (see :data:`COLUMNS`); ``d`` decides its readable rows."""
    records: list[dict[str, Any]] = []
    row = 0
    for i, input_id in enumerate(batch.ids):
        rec: dict[str, Any] = dict.fromkeys(COLUMNS)
        rec["input"] = input_id
        if not batch.readable[i]:
            rec["decision"], rec["error"] = ERROR, batch.errors[i]
            records.append(rec)
            continue
        assert d is not None
        k = int(d.class_index[row])
        answered = bool(d.answered[row])
        if not answered and d.prediction_set is not None:
            rec["prediction_set"] = [class_names[j] for j in np.flatnonzero(d.prediction_set[row])]
        rec.update(
            decision="predict" if answered else "abstain",
            label=class_names[k] if answered else None,
            candidate=None if answered else class_names[k],
            class_index=k,
            confidence=float(d.confidence[row]),
            score=d.point.score,
            score_value=float(d.score_value[row]),
            threshold=d.threshold(row),  # a class-conditional point: the class's (None: never answered)
            operating_point=d.point.name,
        )
        if batch.y is not None:
            rec["true_label"] = class_names[int(batch.y[row])]
            rec["correct"] = bool(k == int(batch.y[row]))
        records.append(rec)
        row += 1
    return records


class RecordWriter:
    """Writes records to an open binary file in one of :data:`OUTPUT_FORMATS`."""

    def __init__(self, handle: IO[bytes], fmt: str) -> None:
        self.handle, self.fmt = handle, fmt
        self._parquet: Any = None
        if fmt == "csv":
            self._text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
            self._csv = csv.DictWriter(self._text, fieldnames=COLUMNS)
            self._csv.writeheader()

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fmt == "jsonl":
            self.handle.write("".join(json.dumps(r) + "\n" for r in records).encode())
        elif self.fmt == "csv":  # a set as a JSON list: CSV has no lists
            self._csv.writerows(
                {**r, "prediction_set": json.dumps(r["prediction_set"])}
                if r["prediction_set"] is not None
                else r
                for r in records
            )
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(records, schema=PARQUET_SCHEMA())
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.handle, table.schema)
            self._parquet.write_table(table)

    def close(self) -> None:
        if self.fmt == "csv":
            self._text.flush()
            self._text.detach()  # leave the handle open: atomic_writer fsyncs and closes it
        elif self.fmt == "parquet":
            if self._parquet is None:  # no records: still a valid, empty Parquet file
                self.write([])
            self._parquet.close()


def PARQUET_SCHEMA() -> Any:  # noqa: N802 — a constant, built lazily so pyarrow loads only for Parquet
    """The Parquet schema of :data:`COLUMNS` (typed, nullable)."""
    import pyarrow as pa

    types = {
        "class_index": pa.int64(),
        "confidence": pa.float64(),
        "score_value": pa.float64(),
        "threshold": pa.float64(),
        "correct": pa.bool_(),
        "prediction_set": pa.list_(pa.string()),
    }
    return pa.schema([(name, types.get(name, pa.string())) for name in COLUMNS])


@dataclass
class PredictSummary:
    """Counts of one run; risk and accuracy need labels (``None`` without)."""

    path: Path
    operating_point: str
    images: int = 0
    errors: int = 0
    answered: int = 0
    labelled: int = 0
    correct: int = 0
    answered_correct: int = 0

    @property
    def decided(self) -> int:
        return self.images - self.errors

    @property
    def coverage(self) -> float | None:
        return self.answered / self.decided if self.decided else None

    @property
    def selective_risk(self) -> float | None:
        """Errors among the answered (labelled inputs only)."""
        if not self.labelled or not self.answered:
            return None
        return 1.0 - self.answered_correct / self.answered

    @property
    def accuracy(self) -> float | None:
        """Accuracy at full coverage (every readable labelled input)."""
        return self.correct / self.labelled if self.labelled else None

    def add(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.images += 1
            if r["decision"] == ERROR:
                self.errors += 1
                continue
            answered = r["decision"] == "predict"
            self.answered += answered
            if r["correct"] is not None:
                self.labelled += 1
                self.correct += r["correct"]
                self.answered_correct += answered and r["correct"]


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"--out should end with one of {', '.join(OUTPUT_FORMATS)}, but got {str(path)!r}")
    return fmt


def run_predict(
    model_dir: Path,
    out: Path,
    *,
    input_path: Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    data_root: Path | None = None,
    operating_point: str | None = None,
    batch_size: int = 256,
    fail_fast: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PredictSummary:
    """Decide every input and write one record each to ``out`` (atomically).

    Args:
        model_dir: ``models/<name>`` (latest version) or ``models/<name>/<version>``, calibrated.
        out: ``.jsonl``, ``.csv`` or ``.parquet`` file to write.
        input_path: an image folder, a Parquet file (the columns of
            :class:`abstain.calibration.selector.Selector`) or an ``.npz``; or give ``dataset``
            (+ ``split``, ``data_root``).
        operating_point: a name in the calibration (default: its default point).
        progress: called with ``(done, total)`` after each batch.

    Raises:
        ValueError: bad arguments, an uncalibrated or mismatched graph, unreadable input data,
            or (with ``fail_fast``) the first unreadable image.
    """
    fmt = output_format(out)
    if int(batch_size) < 1:
        raise ValueError(f"batch size should be at least 1, but got {batch_size!r}")
    if (input_path is None) == (dataset is None):
        raise ValueError(
            "give exactly one input: INPUT (an image folder or an .npz), or --dataset NAME --split SPLIT"
        )
    from abstain.calibration.selector import Selector, parquet_batches

    selector = Selector(model_dir, operating_point)  # the graph checked against its calibration
    model, point = selector.model, selector.point

    if input_path is not None and Path(input_path).is_dir():
        total, batches = folder_batches(Path(input_path), model, batch_size, fail_fast)
    elif input_path is not None and Path(input_path).suffix.lower() == ".parquet":
        total, batches = parquet_batches(Path(input_path), selector, batch_size)
    elif input_path is not None:
        if not Path(input_path).is_file():
            raise FileNotFoundError(f"{input_path}: no such image folder or .npz file")
        total, batches = labelled_batches(model, batch_size, data=Path(input_path))
    else:
        total, batches = labelled_batches(
            model, batch_size, dataset=dataset, split=split, data_root=data_root, data=None
        )

    summary = PredictSummary(path=Path(out), operating_point=point.name)
    with atomic_writer(Path(out), "wb") as handle:
        writer = RecordWriter(handle, fmt)
        for batch in batches:
            d = None
            if batch.x.shape[0]:
                outputs = model.run(batch.x)
                d = decide_arrays(outputs.logits, outputs.selection, point, outputs.selection_logit)
            records = batch_records(batch, d, model.class_names)
            writer.write(records)
            summary.add(records)
            if progress is not None:
                progress(summary.images, total)
        writer.close()
    return summary
