"""``abstain predict --engine ray``: the offline decisions of ``abstain predict`` on Ray Data.

The pipeline is Ray's batch-inference pattern: read → ``map_batches`` with a callable class
(:class:`abstain.calibration.selector.Selector`; one instance per actor, so the graph loads
once per actor) → ``write_parquet``. Inputs, by what the path (any URI that ``pyarrow.fs``
opens) holds:

* an image folder (PNG/JPEG, recursive, hidden entries skipped, as ``abstain predict``
  lists it): listed on the driver, then read and decoded in the actors, so that an unreadable
  file is an error row of a finished job, not a failed read task;
* Parquet (a file, or a folder of ``*.parquet`` files) with a ``pixels`` column and
  optionally ``input`` and ``label`` (the columns a :class:`Selector` takes);
* an ``.npz`` (``x``, optional ``y``), or a built-in array data set's split, read on the
  driver and handed to Ray in blocks.

The graph and its calibration travel to the actors as bytes (:class:`EntryFiles`), so the
nodes of a cluster need no shared file system, and each actor checks the graph's sha256
against the calibration when it loads. Actors that die (a node lost, a process killed) are
restarted and their batches retried by Ray, a bounded number of times
(:data:`MAX_RESTARTS`). The output is a folder of Parquet partitions with the columns and
types of ``abstain predict --out *.parquet``, written under a hidden sibling folder and moved
to its final path only when the job has succeeded: a failed job leaves nothing at the path.
"""

from __future__ import annotations

import io
import logging
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from abstain.calibration.predict import (
    ERROR,
    PARQUET_SCHEMA,
    PREDICT_IMAGE_SUFFIXES,
    PredictSummary,
    in_class_folders,
    is_hidden,
)
from abstain.calibration.selector import EntryFiles, Selector, load_entry

#: How often Ray restarts a dead actor, and retries the batch it held, before the job fails:
#: enough for a lost node or a killed process; a batch that kills every actor it meets
#: (a crash in native code) fails the job instead of looping.
MAX_RESTARTS = 3
#: CPUs a read or write task asks the scheduler for: they wait on I/O, and with the default of
#: one CPU each, actors holding every CPU of a small cluster would leave them none (a deadlock).
IO_TASK_CPUS = 0.25


@dataclass(frozen=True)
class RayInput:
    """What the input path holds: ``kind`` is ``images``, ``parquet`` or ``arrays``."""

    kind: str
    filesystem: Any  # pyarrow.fs.FileSystem
    paths: list[str]  # files to read (images, parquet); empty for arrays
    root: str | None = None  # the image folder, ids are relative to it
    folder_labels: bool = False  # every image sits in a folder named after a class
    x: np.ndarray | None = None  # arrays: float [N, C, H, W]
    y: np.ndarray | None = None  # arrays: int64 [N] labels, or None


def open_filesystem(uri: str | Path) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path)`` for a local path or any URI ``pyarrow.fs`` knows."""
    import pyarrow.fs as pafs

    text = str(uri)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def resolve_input(uri: str | Path, class_names: list[str]) -> RayInput:
    """Look at ``uri`` and say how to read it (see the module's docstring).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: a folder with no images and no Parquet files, or a file of another kind.
    """
    import pyarrow.fs as pafs

    fs, path = open_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such image folder, Parquet or .npz")
    if info.type == pafs.FileType.File:
        suffix = posixpath.splitext(path)[1].lower()
        if suffix == ".parquet":
            return RayInput("parquet", fs, [path])
        if suffix == ".npz":
            from abstain.calibration.predict import load_npz_input

            with fs.open_input_file(path) as handle:
                x, y = load_npz_input(io.BytesIO(handle.read()), name=str(uri))
            return RayInput("arrays", fs, [], x=x, y=y)
        raise ValueError(f"{uri}: give an image folder, a Parquet file or folder, or an .npz")
    files = [
        f.path
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and not is_hidden(posixpath.relpath(f.path, path).split("/"))
    ]
    parquet = sorted(p for p in files if p.lower().endswith(".parquet"))
    images = sorted(p for p in files if posixpath.splitext(p)[1].lower() in PREDICT_IMAGE_SUFFIXES)
    if parquet and not images:
        return RayInput("parquet", fs, parquet)
    if not images:
        raise ValueError(
            f"{uri}: no images ({', '.join(PREDICT_IMAGE_SUFFIXES)}) and no .parquet files "
            "in the folder or below it"
        )
    relative = [posixpath.relpath(p, path).split("/") for p in images]
    return RayInput("images", fs, images, root=path, folder_labels=in_class_folders(relative, class_names))


class _ParquetRows:
    """The actor's callable: a :class:`Selector` whose records come back as an Arrow table of
    :func:`~abstain.calibration.predict.PARQUET_SCHEMA` (typed, nullable), so every partition
    has the schema of ``abstain predict --out *.parquet`` even when a batch has a column that
    is all ``None`` (numpy → Arrow would infer the null type for it)."""

    def __init__(self, selector_class: type[Selector], **kwargs: Any) -> None:
        self.selector = selector_class(**kwargs)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> Any:
        import pyarrow as pa

        return pa.Table.from_pylist(self.selector.records(batch), schema=PARQUET_SCHEMA())


def _dataset(source: RayInput, batch_size: int) -> Any:
    import pyarrow as pa
    import ray.data

    if source.kind == "images":
        # The paths only: the actors read the files themselves (Selector's ``path`` column), so
        # the bytes make no trip through a read task and the object store (docs/benchmarks.md,
        # "Offline prediction on Ray": read_binary_files cost about as much as decoding).
        paths = pa.array(source.paths)
        step = batch_size * 4
        return ray.data.from_arrow(
            [pa.table({"path": paths.slice(i, step)}) for i in range(0, len(paths), step)]
        )
    if source.kind == "parquet":
        return ray.data.read_parquet(source.paths, filesystem=source.filesystem, num_cpus=IO_TASK_CPUS)
    from ray.data.extensions import ArrowTensorArray

    assert source.x is not None
    n = source.x.shape[0]
    columns: dict[str, Any] = {
        "input": pa.array([str(i) for i in range(n)]),
        "pixels": ArrowTensorArray.from_numpy(source.x),
    }
    if source.y is not None:
        columns["label"] = pa.array(source.y)
    table = pa.table(columns)
    # several blocks, so that every actor gets some: one in-memory block is one task
    return ray.data.from_arrow([table.slice(i, batch_size * 4) for i in range(0, n, batch_size * 4)])


def summarise(filesystem: Any, folder: str, out: str, operating_point: str) -> PredictSummary:
    """The counts of ``abstain predict``'s summary, read back from the written partitions."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    table = pads.dataset(folder, filesystem=filesystem, format="parquet", schema=PARQUET_SCHEMA()).to_table(
        columns=["decision", "correct"]
    )
    decision, correct = table.column("decision"), table.column("correct")
    answered = pc.equal(decision, "predict")
    labelled = pc.is_valid(correct)
    return PredictSummary(
        path=Path(out),
        operating_point=operating_point,
        images=table.num_rows,
        errors=int(pc.sum(pc.equal(decision, ERROR)).as_py() or 0),
        answered=int(pc.sum(answered).as_py() or 0),
        labelled=int(pc.sum(labelled).as_py() or 0),
        correct=int(pc.sum(pc.fill_null(correct, False)).as_py() or 0),
        answered_correct=int(pc.sum(pc.and_(answered, pc.fill_null(correct, False))).as_py() or 0),
    )


def run_predict_ray(
    model_dir: Path,
    out: str | Path,
    *,
    input_path: str | Path | None = None,
    dataset: str | None = None,
    split: str = "test",
    data_root: Path | None = None,
    operating_point: str | None = None,
    batch_size: int = 256,
    address: str | None = None,
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
    progress: bool = True,
    selector_class: type[Selector] = Selector,
) -> PredictSummary:
    """Decide every input on Ray Data and write Parquet partitions to the folder ``out``.

    Args:
        model_dir: ``models/<name>`` or ``models/<name>/<version>``, calibrated.
        out: a folder (local path or URI) that must not exist yet.
        input_path: an image folder, Parquet or ``.npz`` (local path or URI); or ``dataset``
            (a built-in array data set: ``split``, ``data_root``).
        address: a running cluster (``auto``, ``ray://host:port``, ``host:port``); ``None``
            starts a local one for the run (unless Ray is already initialised in this process).
        concurrency: actors, each with one :class:`Selector` (the graph loaded once each).
        cpus_per_actor: CPUs each actor asks for; its ONNX Runtime threads are that many.
        progress: Ray Data's progress bars.
        selector_class: a :class:`Selector` subclass to run instead (extra columns, tests).

    Raises:
        ValueError / FileNotFoundError: as ``abstain predict``, and an existing ``out``.
        Whatever the job raised, after removing its partial output.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch size should be at least 1, but got {batch_size!r}")
    if int(concurrency) < 1:
        raise ValueError(f"concurrency (actors) should be at least 1, but got {concurrency!r}")
    if not cpus_per_actor > 0:
        raise ValueError(f"CPUs per actor should be positive, but got {cpus_per_actor!r}")
    if posixpath.splitext(str(out))[1].lower() in (".jsonl", ".csv"):
        raise ValueError(
            f"--out {out}: --engine ray writes a folder of Parquet partitions, not one "
            ".jsonl or .csv file; give a folder name (e.g. decisions/ or decisions.parquet/)"
        )
    if (input_path is None) == (dataset is None):
        raise ValueError(
            "give exactly one input: INPUT (an image folder, Parquet or an .npz), "
            "or --dataset NAME --split SPLIT"
        )
    import pyarrow.fs as pafs

    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ValueError(f"--engine ray needs Ray ({exc}): pip install 'abstain[ray]'") from None
    entry = EntryFiles.read(model_dir)
    model, _, point = load_entry(entry, operating_point, intra_op_threads=1)  # fail here, not in an actor
    if dataset is not None:
        from abstain.calibration.data_sources import open_labelled_data

        split_data = open_labelled_data(
            model.input_spec, model.class_names, dataset=dataset, split=split, data_root=data_root
        ).materialise()
        source = RayInput("arrays", pafs.LocalFileSystem(), [], x=split_data.x, y=split_data.y)
    else:
        assert input_path is not None
        source = resolve_input(input_path, model.class_names)
    del model

    out_fs, out_path = open_filesystem(out)
    if out_fs.get_file_info(out_path).type != pafs.FileType.NotFound:
        raise FileExistsError(
            f"{out}: already exists; --engine ray writes a new folder of Parquet partitions"
        )
    staging = posixpath.join(
        posixpath.dirname(out_path), f".{posixpath.basename(out_path)}.tmp-{uuid.uuid4().hex[:12]}"
    )

    started_here = not ray.is_initialized()
    if started_here:
        # log_to_driver=False: the actors' own logs stay in the session's log folder (a failure reaches
        # the driver as the exception Ray Data raises, with its traceback)
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        decided = _dataset(source, batch_size).map_batches(
            _ParquetRows,
            fn_constructor_kwargs={
                "selector_class": selector_class,
                "entry": entry,
                "operating_point": point.name,
                "intra_op_threads": max(1, int(cpus_per_actor)),
                "folder_root": source.root,
                "folder_labels": source.folder_labels,
                "filesystem": source.filesystem,
            },
            batch_size=int(batch_size),
            compute=ray.data.ActorPoolStrategy(size=int(concurrency)),
            num_cpus=cpus_per_actor,
            batch_format="numpy",
            ray_remote_args_fn=lambda: {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_RESTARTS},
        )
        try:
            decided.write_parquet(
                staging,
                filesystem=out_fs,
                schema=PARQUET_SCHEMA(),
                ray_remote_args={"num_cpus": IO_TASK_CPUS},
            )
            summary = summarise(out_fs, staging, str(out), point.name)
            out_fs.move(staging, out_path)
        except BaseException:
            if out_fs.get_file_info(staging).type != pafs.FileType.NotFound:
                out_fs.delete_dir(staging)
            raise
    finally:
        if started_here:
            ray.shutdown()
    return summary
