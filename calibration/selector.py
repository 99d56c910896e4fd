"""A predict-or-abstain callable for columns of data: the unit that batch engines run.

:class:`Selector` is built from a model-repository entry (``models/<name>[/<version>]``: the
graph and its ``calibration.json``) and an operating point, and turns a batch of columns into
the records of ``abstain predict`` (:data:`abstain.calibration.predict.COLUMNS`), decided by
the same code: pixels checked as the service checks them, the graph run by
:class:`abstain.runtime.OnnxModel`, decisions from :func:`abstain.decisions.decide_arrays`,
records from :func:`abstain.calibration.predict.batch_records`. It is what Ray Data's
``Dataset.map_batches`` calls with a class (one instance per actor, so the graph loads once
per actor; ``abstain predict --engine ray``, :mod:`abstain.calibration.ray_engine`), and what
``abstain predict`` uses on a Parquet input. numpy, ONNX Runtime and Pillow only: no Ray, no
torch.

Input columns (``B`` rows), exactly one of:

* ``bytes``: encoded image files (PNG, JPEG), as ``ray.data.read_binary_files`` gives them,
  decoded exactly as ``abstain predict`` decodes a folder's files;
* ``image``: decoded images, uint8 ``[H, W]`` or ``[H, W, C]`` (``ray.data.read_images``),
  converted as a client's image upload is (:func:`abstain.images.fit_image`);
* ``pixels``: each row the graph's ``C·H·W`` values, as ``[C, H, W]`` or flat, float in
  [0, 1] or uint8 0–255 (divided by 255, as ``/predict`` takes ``.npy`` uint8);

or only ``path``: image files the selector reads itself (from its ``filesystem``, any
``pyarrow.fs`` file system; default the local one) and decodes as ``bytes``;

and optionally ``input`` (the row's id; default ``path`` when present, else the row's index
in the batch) and ``label`` (the true class index, for risk and accuracy). A row that cannot
be decided (an unreadable image, a wrong shape, NaN, a pixel outside its range, a label
outside the classes) becomes an ``error`` record naming why; the batch goes on.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abstain.calibration.data_sources import image_to_pixels
from abstain.calibration.predict import COLUMNS, Batch, batch_records
from abstain.contract import CALIBRATION_FILENAME, MODEL_FILENAME, resolve_version_dir
from abstain.decisions import decide_arrays
from abstain.images import fit_image
from abstain.operating_points import (
    Calibration,
    OperatingPoint,
    calibration_from_dict,
    check_score_scale,
    verify_graph,
)
from abstain.runtime import OnnxModel

#: The columns that carry a row's image, one of which a batch must have (or else only ``path``).
PIXEL_COLUMNS = ("bytes", "image", "pixels")
#: Files a selector reads at once from a ``path`` column.
READ_THREADS = 8


@dataclass(frozen=True)
class EntryFiles:
    """The two files of a model-repository entry, as bytes: what a worker needs to decide.

    Shipped to workers instead of a path, so that the workers of a cluster need no shared
    file system; each worker checks the graph's sha256 against the calibration itself.
    """

    graph: bytes
    calibration: bytes
    where: str  # the entry's folder, for messages

    @classmethod
    def read(cls, model_dir: Path | str) -> EntryFiles:
        """``model_dir``: ``models/<name>`` (latest version) or ``models/<name>/<version>``."""
        version_dir = resolve_version_dir(Path(model_dir))
        calibration_path = version_dir / CALIBRATION_FILENAME
        if not calibration_path.is_file():
            raise FileNotFoundError(
                f"{calibration_path}: no calibration; run `abstain calibrate {model_dir}` first"
            )
        graph_path = version_dir / MODEL_FILENAME
        if not graph_path.is_file():
            raise FileNotFoundError(f"{graph_path}: no graph in the model-repository entry")
        return cls(graph_path.read_bytes(), calibration_path.read_bytes(), str(version_dir))


def load_entry(
    entry: EntryFiles, operating_point: str | None, intra_op_threads: int | None = None
) -> tuple[OnnxModel, Calibration, OperatingPoint]:
    """The graph in ONNX Runtime, its calibration and the chosen point, checked together.

    Raises:
        ValueError: malformed calibration, a graph that is not the calibrated one (sha256),
            scores on the wrong scale, or an unknown operating point.
    """
    import json

    where = f"{entry.where}/{CALIBRATION_FILENAME}"
    try:
        raw = json.loads(entry.calibration)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from exc
    calibration = calibration_from_dict(raw, where)
    graph_path = Path(entry.where) / MODEL_FILENAME
    model = OnnxModel(entry.graph, intra_op_threads=intra_op_threads, path=graph_path)
    verify_graph(calibration, graph_path, graph_sha256=model.sha256)
    check_score_scale(calibration, model.has_selection_logit, where)
    try:
        point = calibration.operating_point(operating_point)
    except KeyError as exc:  # a user's typo: one line, not a traceback
        raise ValueError(exc.args[0]) from None
    return model, calibration, point


class Selector:
    """Predict-or-abstain over a batch of columns (see the module's docstring).

    Args:
        entry: a model-repository entry's folder, or its :class:`EntryFiles`.
        operating_point: a name in the calibration (default: its default point).
        intra_op_threads: ONNX Runtime threads (``None``: its default, one per core); an
            engine running several selectors on one machine gives each its share.
        folder_root: with a ``path`` column, ``input`` is the path relative to this folder
            (as ``abstain predict`` names a folder's files).
        folder_labels: the first folder of that relative path is the class name
            (``root/<class>/…``, an ImageFolder tree), giving ``true_label`` and ``correct``.
        filesystem: the ``pyarrow.fs`` file system a ``path``-only batch is read from
            (default: the local one).

    Calling it with ``dict[str, np.ndarray]`` columns of ``B`` rows returns ``B`` rows of
    :data:`~abstain.calibration.predict.COLUMNS`, as numpy arrays (object arrays where a
    column may be ``None``), in the input's order.
    """

    def __init__(
        self,
        entry: EntryFiles | Path | str,
        operating_point: str | None = None,
        *,
        intra_op_threads: int | None = None,
        folder_root: str | None = None,
        folder_labels: bool = False,
        filesystem: Any = None,
    ) -> None:
        files = entry if isinstance(entry, EntryFiles) else EntryFiles.read(entry)
        self.model, self.calibration, self.point = load_entry(files, operating_point, intra_op_threads)
        self.class_names: list[str] = self.model.class_names
        self.folder_root = folder_root
        self.folder_labels = folder_labels
        self.filesystem = filesystem

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return records_to_columns(self.records(batch))

    def records(self, batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """One record per row of ``batch``, as ``abstain predict`` writes them."""
        parsed = self.parse(batch)
        decisions = None
        if parsed.x.shape[0]:
            outputs = self.model.run(parsed.x)
            decisions = decide_arrays(outputs.logits, outputs.selection, self.point, outputs.selection_logit)
        return batch_records(parsed, decisions, self.class_names)

    def parse(self, batch: Mapping[str, np.ndarray]) -> Batch:
        """The columns as a :class:`~abstain.calibration.predict.Batch`: pixels of the rows that
        can be decided, the reason for each that cannot.

        Raises:
            ValueError: the batch has none or several of :data:`PIXEL_COLUMNS` (a pipeline's
                mistake, not a record's: every row would fail alike).
        """
        present = [name for name in PIXEL_COLUMNS if name in batch]
        if not present and "path" in batch:  # image files this selector reads itself
            present = ["path"]
        if len(present) != 1:
            raise ValueError(
                f"a batch should have exactly one of the columns {', '.join(PIXEL_COLUMNS)} "
                f"(encoded image files, decoded images, or pixels), or only a path column "
                f"(image files to read), but has {sorted(batch)}"
            )
        n = len(batch[present[0]])
        ids = self._ids(batch, n)
        labels, label_errors = self._labels(batch, ids, n)
        column: Any = batch[present[0]]
        if present == ["path"]:
            column, present = self._read_files(column, ids), ["bytes"]
        spec = self.model.input_spec
        x = np.empty((n, *spec.shape), dtype=np.float32)
        readable = np.zeros(n, dtype=bool)
        errors: dict[int, str] = {}
        for i in range(n):
            try:
                if i in label_errors:
                    raise ValueError(label_errors[i])
                x[int(readable.sum())] = self._pixels(present[0], column[i], ids[i])
                readable[i] = True
            except ValueError as exc:
                errors[i] = str(exc)
        y = None if labels is None else labels[readable]
        return Batch(ids=ids, x=x[: int(readable.sum())], readable=readable, errors=errors, y=y)

    def _read_files(self, paths: Sequence[Any], ids: Sequence[str]) -> list[bytes | ValueError]:
        """Each file's bytes, or the ``ValueError`` that says why it cannot be read: one after the
        other from a local disk, up to :data:`READ_THREADS` at once from any other file system
        (object stores answer each read after a round trip)."""
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.fs as pafs

        filesystem = self.filesystem if self.filesystem is not None else pafs.LocalFileSystem()

        def read(i: int) -> bytes | ValueError:
            try:
                with filesystem.open_input_stream(str(paths[i])) as stream:
                    return bytes(stream.read())
            except OSError as exc:  # missing, unreadable, a network error after retries
                return ValueError(f"{ids[i]}: cannot read the file ({exc})")

        if isinstance(filesystem, pafs.LocalFileSystem):  # a local read is cheaper than a thread hop
            return [read(i) for i in range(len(paths))]
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, max(1, len(paths)))) as pool:
            return list(pool.map(read, range(len(paths))))

    def _ids(self, batch: Mapping[str, np.ndarray], n: int) -> list[str]:
        if "input" in batch:
            return [str(v) for v in batch["input"]]
        if "path" in batch:
            paths = [str(v) for v in batch["path"]]
            if self.folder_root is None:
                return paths
            return [posixpath.relpath(p, self.folder_root) for p in paths]
        return [str(i) for i in range(n)]

    def _labels(
        self, batch: Mapping[str, np.ndarray], ids: Sequence[str], n: int
    ) -> tuple[np.ndarray | None, dict[int, str]]:
        """int64 ``[B]`` true labels (or ``None``), and the rows whose label is not a class."""
        k = len(self.class_names)
        errors: dict[int, str] = {}
        if "label" in batch:
            raw = list(batch["label"])
        elif self.folder_labels:
            index = {name: i for i, name in enumerate(self.class_names)}
            raw = [index.get(rel.split("/", 1)[0], -1) for rel in ids]
        else:
            return None, errors
        labels = np.zeros(n, dtype=np.int64)
        for i, value in enumerate(raw):
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < k:
                labels[i] = int(value)
            else:
                errors[i] = f"{ids[i]}: label {value!r} is not a class index in [0, {k})"
        return labels, errors

    def _pixels(self, kind: str, value: Any, input_id: str) -> np.ndarray:
        """One row → float32 ``[C, H, W]`` in [0, 1]; ``ValueError`` saying what is wrong."""
        spec = self.model.input_spec
        if kind == "bytes":
            if isinstance(value, ValueError):  # a file _read_files could not read
                raise value
            return image_to_pixels(io.BytesIO(bytes(value)), spec, name=input_id)
        if kind == "image":
            from PIL import Image

            try:
                image = Image.fromarray(np.asarray(value))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{input_id}: not an image array ({exc})") from exc
            return fit_image(image, spec)
        return pixel_row(value, spec.shape, input_id)


def pixel_row(value: Any, shape: tuple[int, int, int], input_id: str) -> np.ndarray:
    """One row of a ``pixels`` column → float32 ``shape`` in [0, 1], checked as the service checks.

    Accepted: ``C·H·W`` values (``[C, H, W]`` or flat), float in [0, 1] or uint8 0–255.
    """
    x = np.asarray(value)
    want = int(np.prod(shape))
    if not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise ValueError(
            f"{input_id}: pixels should be float in [0, 1] or uint8 0-255, but got dtype {x.dtype}"
        )
    if x.size != want or (x.ndim != 1 and tuple(x.shape) != shape):
        raise ValueError(
            f"{input_id}: pixels should be {list(shape)} (or {want} values, flat), "
            f"but got shape {list(x.shape)}"
        )
    if x.dtype == np.uint8:
        return np.divide(x.reshape(shape), np.float32(255), dtype=np.float32)
    x = x.reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{input_id}: pixels contain NaN or Inf; they should be finite values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{input_id}: pixels should be in [0, 1] (or uint8), but got values in [{lo:g}, {hi:g}]"
        )
    return x


def parquet_batches(path: Path, selector: Selector, batch_size: int) -> tuple[int, Iterator[Batch]]:
    """A Parquet file of :class:`Selector` columns, read ``batch_size`` rows at a time; row ids
    default to the row's index in the file."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # ArrowInvalid for a file that is not Parquet
        raise ValueError(f"{path}: cannot read as Parquet ({exc})") from exc
    names = set(parquet.schema_arrow.names)
    if not names & set(PIXEL_COLUMNS):
        raise ValueError(
            f"{path}: a Parquet input should have one of the columns {', '.join(PIXEL_COLUMNS)} "
            f"(and optionally input, label), but has {sorted(names)}"
        )
    wanted = [c for c in (*PIXEL_COLUMNS, "input", "path", "label") if c in names]

    def batches() -> Iterator[Batch]:
        start = 0
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=wanted):
            columns = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in wanted}
            if "input" not in columns and "path" not in columns:
                columns["input"] = np.arange(start, start + record_batch.num_rows).astype(str)
            start += record_batch.num_rows
            yield selector.parse(columns)

    return parquet.metadata.num_rows, batches()


#: The numpy type of each record column when it has no ``None`` (else an object array).
_DTYPES: dict[str, Any] = {"class_index": np.int64, "confidence": np.float64, "score_value": np.float64,
                           "threshold": np.float64, "correct": np.bool_}  # fmt: skip


def records_to_columns(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Records → one numpy array per column of :data:`COLUMNS` (object dtype where ``None`` occurs)."""
    columns: dict[str, np.ndarray] = {}
    for name in COLUMNS:
        values = [r[name] for r in records]
        dtype = _DTYPES.get(name, object)
        if dtype is not object and any(v is None for v in values):
            dtype = object
        columns[name] = np.array(values, dtype=dtype) if values else np.empty(0, dtype=dtype)
    return columns
