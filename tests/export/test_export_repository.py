"""The repository entry: Triton config accepted by Triton's schema, versions, atomic commit."""

from __future__ import annotations

import os

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from abstain.contract import LABELS_FILENAME, MODEL_FILENAME, TRITON_CONFIG_FILENAME, InputSpec
from abstain.export import repository as repo_module
from abstain.export.repository import commit_entry, plan_entry, render_triton_config
from tests.export.export_helpers import snapshot

SPEC = InputSpec(1, 8, 8)
LABELS = [str(i) for i in range(10)]
CONFIG = render_triton_config("digits", SPEC, 10, max_batch_size=64)


def write(tmp_path, data=b"graph-1", **kwargs):
    repository = tmp_path / "models"
    plan = plan_entry(
        repository,
        kwargs.pop("name", "digits"),
        kwargs.pop("labels", LABELS),
        kwargs.pop("config", CONFIG),
        **kwargs,
    )
    return plan, commit_entry(plan, data, CONFIG, LABELS)


def test_config_parses_with_tritons_model_config_schema():
    config = model_config_pb2.ModelConfig()
    text_format.Parse(
        render_triton_config("digits", InputSpec(3, 32, 32, (0.0,) * 3, (1.0,) * 3), 100, 128), config
    )
    assert config.name == "digits" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 128 and config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("pixels", model_config_pb2.TYPE_FP32, [3, 32, 32])
    ]
    logits, selection, selection_logit = config.output
    assert (logits.name, list(logits.dims), logits.label_filename) == ("logits", [100], LABELS_FILENAME)
    for scalar, name in ((selection, "selection"), (selection_logit, "selection_logit")):
        assert (scalar.name, list(scalar.dims)) == (name, [1])
        assert scalar.HasField("reshape") and list(scalar.reshape.shape) == []
    # an older graph without the logit gets the two-output config
    older = model_config_pb2.ModelConfig()
    text_format.Parse(render_triton_config("digits", SPEC, 10, selection_logit=False), older)
    assert [o.name for o in older.output] == ["logits", "selection"]


def test_first_export_writes_entry_then_next_free_versions(tmp_path):
    plan, path = write(tmp_path)
    entry = tmp_path / "models" / "digits"
    assert plan.version == 1 and path == entry / "1" / MODEL_FILENAME and path.read_bytes() == b"graph-1"
    assert (entry / LABELS_FILENAME).read_text() == "\n".join(LABELS) + "\n"
    assert (entry / TRITON_CONFIG_FILENAME).read_text() == CONFIG
    (entry / "7").mkdir()  # a gap: the next free version is after the highest
    (entry / "7" / MODEL_FILENAME).write_bytes(b"graph-7")
    plan, path = write(tmp_path, b"graph-8")
    assert plan.version == 8 and path.read_bytes() == b"graph-8"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["digits"]  # no staging left


def test_existing_version_needs_force_and_force_replaces(tmp_path):
    write(tmp_path, b"old", version=3)
    before = snapshot(tmp_path / "models")
    with pytest.raises(FileExistsError, match=r"3 already exists; pass --force"):
        write(tmp_path, b"new", version=3)
    assert snapshot(tmp_path / "models") == before
    plan, path = write(tmp_path, b"new", version=3, force=True)
    assert plan.replace_version and path.read_bytes() == b"new"
    assert sorted(snapshot(tmp_path / "models")) == [
        "digits",
        "digits/3",
        "digits/3/model.onnx",
        "digits/config.pbtxt",
        "digits/labels.txt",
    ]


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 65])
def test_bad_names_are_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ValueError, match="model name should be"):
        write(tmp_path, name=name)
    assert not (tmp_path / "models").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("version", [0, -2])
def test_bad_versions_are_refused(tmp_path, version):
    with pytest.raises(ValueError, match="--version should be a positive integer"):
        write(tmp_path, version=version)


def test_entry_with_other_labels_or_shape_is_refused(tmp_path):
    write(tmp_path)
    before = snapshot(tmp_path / "models")
    with pytest.raises(ValueError, match=r"lists classes .* but this checkpoint has"):
        write(tmp_path, labels=[f"c{i}" for i in range(10)])
    other_shape = render_triton_config("digits", InputSpec(1, 28, 28), 10, max_batch_size=64)
    with pytest.raises(ValueError, match="declares other inputs/outputs"):
        write(tmp_path, config=other_shape)
    assert snapshot(tmp_path / "models") == before
    # another max_batch_size (a hand tuning Triton allows) is not a contract change
    write(tmp_path, config=render_triton_config("digits", SPEC, 10, max_batch_size=8))


def test_repository_under_a_regular_file_is_refused(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        plan_entry(blocker / "models", "digits", LABELS, CONFIG)
    assert blocker.read_text() == "x"


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes through chmod 0o555; the regular-file test covers it"
)
def test_read_only_repository_is_refused(tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    repository.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            plan_entry(repository, "digits", LABELS, CONFIG)
    finally:
        repository.chmod(0o755)
    assert list(repository.iterdir()) == []


@pytest.mark.parametrize("fail_at_call", [1, 2])
def test_interrupted_commit_leaves_repository_exactly_as_it_was(tmp_path, monkeypatch, fail_at_call):
    write(tmp_path, b"v1", version=1)
    write(tmp_path, b"v2", version=2)
    before = snapshot(tmp_path / "models")
    real_rename, calls = os.rename, []

    def interrupted_rename(src, dst):  # the process is interrupted at the n-th rename
        calls.append(dst)
        if len(calls) == fail_at_call:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(repo_module.os, "rename", interrupted_rename)
    # call 1 moves the old version 2 aside, call 2 would move the new one in
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, b"v2-new", version=2, force=True)
    monkeypatch.undo()
    assert snapshot(tmp_path / "models") == before


def test_interrupted_first_export_leaves_no_repository(tmp_path, monkeypatch):
    def interrupted_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(repo_module.os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path)
    assert not (tmp_path / "models").exists()
