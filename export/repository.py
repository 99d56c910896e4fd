"""Writing one model-repository entry in Triton's layout, all or nothing.

    <repository>/<name>/config.pbtxt          Triton config (shared by every version)
    <repository>/<name>/labels.txt            class names, one per line
    <repository>/<name>/<version>/model.onnx  the exported graph

Planning (:func:`plan_entry`) checks everything a user can get wrong — the name, the version,
an existing entry with other labels or shapes, an unwritable repository — *before* the slow
export, and writes nothing. Committing (:func:`commit_entry`) stages the files in a hidden
temp directory inside the repository (same filesystem, so ``rename`` is atomic) and renames
them into place: a new entry appears whole, a new version directory appears whole; on any
error or interrupt the staging directory is removed and the repository is as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abstain.contract import (
    INPUT_NAME,
    LABELS_FILENAME,
    LOGITS_NAME,
    MODEL_FILENAME,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
    TRITON_CONFIG_FILENAME,
    InputSpec,
    read_labels,
    validate_model_name,
    version_dirs,
)
from abstain.io import atomic_write_bytes, atomic_write_text

#: Largest batch Triton may form (dynamic batching); clients may send up to this many images.
DEFAULT_MAX_BATCH_SIZE = 256
#: How long Triton may hold a request to batch it with others: small, since one image is ~ms.
MAX_QUEUE_DELAY_US = 500
#: Prefix of the staging directory inside the repository (hidden, removed on exit).
STAGING_PREFIX = ".abstain-staging-"


def render_triton_config(
    name: str,
    spec: InputSpec,
    num_classes: int,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    selection_logit: bool = True,
) -> str:
    """Triton ``config.pbtxt`` text for an exported graph.

    Dims exclude the batch dimension (``max_batch_size > 0``). ``selection`` is ``[N]`` in the
    graph; with batching Triton needs at least one dim per output, so it is declared ``[1]``
    with ``reshape { shape: [ ] }`` (Triton's documented way to serve a per-item scalar).
    ``labels.txt`` is attached to ``logits`` so Triton's classification extension can name classes.
    ``selection_logit`` (the optional ``[N]`` output, declared like ``selection``) is listed when
    the graph has it, as every graph ``abstain export`` writes does.
    """
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size should be a positive int, but got {max_batch_size!r}")
    c, h, w = spec.shape
    return (
        f'name: "{validate_model_name(name)}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {c}, {h}, {w} ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{LOGITS_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {num_classes} ]\n"
        f'    label_filename: "{LABELS_FILENAME}"\n'
        "  },\n"
        "  {\n"
        f'    name: "{SELECTION_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 1 ]\n"
        "    reshape: { shape: [ ] }\n"
        "  }"
        + (
            ",\n"
            "  {\n"
            f'    name: "{SELECTION_LOGIT_NAME}"\n'
            "    data_type: TYPE_FP32\n"
            "    dims: [ 1 ]\n"
            "    reshape: { shape: [ ] }\n"
            "  }"
            if selection_logit
            else ""
        )
        + "\n"
        "]\n"
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n"
        "}\n"
    )


def config_signature(text: str) -> Any:
    """What of a ``config.pbtxt`` must agree across versions: platform, tensors, dtypes, dims.

    Parsed with Triton's own schema (tritonclient's ``model_config_pb2``) when tritonclient is
    installed, so a hand-edited config (an ``instance_group`` for GPUs, another batch size)
    still matches; without tritonclient, the whitespace-normalised text must be identical.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return " ".join(text.split())
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ValueError(f"existing {TRITON_CONFIG_FILENAME} is not a valid Triton config: {exc}") from exc

    def tensors(items: Any) -> list[tuple[Any, ...]]:
        return sorted((t.name, t.data_type, tuple(t.dims), tuple(t.reshape.shape)) for t in items)

    return (config.platform or config.backend, tensors(config.input), tensors(config.output))


@dataclass(frozen=True)
class EntryPlan:
    """Where :func:`commit_entry` will write, decided (and checked) before anything is written."""

    repository: Path
    name: str
    version: int
    replace_version: bool  # --force over an existing version
    write_config: bool  # the entry has no config.pbtxt yet
    write_labels: bool  # the entry has no labels.txt yet

    @property
    def entry_dir(self) -> Path:
        return self.repository / self.name

    @property
    def version_dir(self) -> Path:
        return self.entry_dir / str(self.version)

    @property
    def model_path(self) -> Path:
        return self.version_dir / MODEL_FILENAME


def _check_writable(repository: Path) -> None:
    """Raise if ``repository`` (or, if absent, its nearest existing ancestor) cannot be written."""
    probe = repository
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(
            f"model repository {repository} cannot be used: {probe} is a file, not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"model repository {repository} is not writable (no write permission on {probe})"
        )


def plan_entry(
    repository: Path,
    name: str,
    class_names: list[str],
    config_text: str,
    version: int | None = None,
    force: bool = False,
) -> EntryPlan:
    """Check and decide where an export goes; writes nothing.

    Args:
        repository: the model repository root (created at commit if absent).
        name: the entry name (:func:`abstain.contract.validate_model_name`).
        class_names: K names; an existing ``labels.txt`` must list exactly these.
        config_text: the config this export would write; an existing one must agree in
            platform, tensor names, dtypes and dims (:func:`config_signature`).
        version: a positive int, or ``None`` for the next free version (highest + 1, or 1).
        force: replace ``version`` if it exists.

    Raises:
        ValueError: bad name or version, or an existing entry with other labels/shapes.
        FileExistsError: ``version`` exists and ``force`` is off.
        NotADirectoryError, PermissionError: the repository cannot be written.
    """
    repository = Path(repository)
    validate_model_name(name)
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"--version should be a positive integer, but got {version!r}")
    _check_writable(repository)
    entry = repository / name
    if entry.exists() and not entry.is_dir():
        raise NotADirectoryError(f"{entry} exists and is not a directory; choose another --name")
    existing = version_dirs(entry)
    chosen = version if version is not None else (existing[-1] + 1 if existing else 1)
    replace = (entry / str(chosen)).exists()
    if replace and not force:
        raise FileExistsError(
            f"{entry / str(chosen)} already exists; pass --force to replace it, or omit --version "
            f"to write the next free version ({(existing[-1] + 1) if existing else 1})"
        )
    labels_path, config_path = entry / LABELS_FILENAME, entry / TRITON_CONFIG_FILENAME
    if labels_path.is_file() and read_labels(labels_path) != list(class_names):
        raise ValueError(
            f"{labels_path} lists classes {read_labels(labels_path)}, but this checkpoint has "
            f"{list(class_names)}; every version of an entry serves the same labels: "
            "export under another --name"
        )
    if config_path.is_file() and config_signature(config_path.read_text()) != config_signature(config_text):
        raise ValueError(
            f"{config_path} declares other inputs/outputs than this graph needs:\n{config_text}"
            "every version of an entry shares one config: export under another --name"
        )
    return EntryPlan(repository, name, chosen, replace, not config_path.is_file(), not labels_path.is_file())


def commit_entry(plan: EntryPlan, model_bytes: bytes, config_text: str, labels: list[str]) -> Path:
    """Write the planned entry atomically; return the path of the written ``model.onnx``.

    On any exception (including ``KeyboardInterrupt``) the staging directory is removed, a
    repository directory this call created is removed, and a replaced version is restored.
    """
    repository = plan.repository
    created_repository = not repository.exists()
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create model repository {repository}: {exc}") from exc
    staging: Path | None = None
    moved_old: Path | None = None
    added: list[Path] = []  # files put into an existing entry, removed again on failure
    try:
        try:
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{plan.name}-", dir=repository))
        except OSError as exc:
            raise PermissionError(f"cannot write to model repository {repository}: {exc}") from exc
        staged_entry = staging / plan.name
        staged_version = staged_entry / str(plan.version)
        atomic_write_bytes(staged_version / MODEL_FILENAME, model_bytes)
        if plan.write_config:
            atomic_write_text(staged_entry / TRITON_CONFIG_FILENAME, config_text)
        if plan.write_labels:
            atomic_write_text(staged_entry / LABELS_FILENAME, "\n".join(labels) + "\n")
        entry = plan.entry_dir
        if not entry.exists():
            os.rename(staged_entry, entry)  # the whole entry appears at once
        else:
            for filename, wanted in (
                (TRITON_CONFIG_FILENAME, plan.write_config),
                (LABELS_FILENAME, plan.write_labels),
            ):
                if wanted:
                    os.replace(staged_entry / filename, entry / filename)
                    added.append(entry / filename)
            if plan.replace_version and plan.version_dir.exists():
                moved_old = staging / "replaced"
                os.rename(plan.version_dir, moved_old)
            # rename() of a directory fails if the target exists and is not empty, so two
            # concurrent exports cannot both claim the same version
            os.rename(staged_version, plan.version_dir)
            moved_old = None  # committed: the old version is garbage now
    except BaseException:
        for path in added:
            path.unlink(missing_ok=True)
        if moved_old is not None and moved_old.exists() and not plan.version_dir.exists():
            os.rename(moved_old, plan.version_dir)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            staging = None
        if created_repository and repository.is_dir() and not any(repository.iterdir()):
            repository.rmdir()
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return plan.model_path
