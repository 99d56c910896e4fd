"""The settings table (``abstain.serving.config.options``) is the one source of every serving default."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import typer

from abstain.serving.cli import serve
from abstain.serving.config import cpus as cpus_module
from abstain.serving.config.cpus import usable_cpus
from abstain.serving.config.options import OPTION, OPTIONS, Option, markdown_table
from abstain.serving.config.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]


def test_settings_fields_are_the_options() -> None:
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    assert set(fields) == set(OPTION)
    for name, field in fields.items():
        if name != "model_dir":
            assert field.default == OPTION[name].default, name


def test_every_variable_reaches_the_settings() -> None:
    environ = {o.env: str(o.minimum + 3) for o in OPTIONS if o.kind is not str and o.minimum is not None}
    environ |= {
        "ABSTAIN_MODEL_DIR": "/m",
        "ABSTAIN_OPERATING_POINT": "op",
        "ABSTAIN_BACKEND": "triton",
        "ABSTAIN_TRITON_URL": "grpc://h:1",
    }
    settings = ServeSettings.from_env(environ)
    assert settings.model_dir == Path("/m") and settings.operating_point == "op"
    assert settings.backend == "triton" and settings.triton_url == "grpc://h:1"
    assert settings.workers == 4 and settings.max_batch == 4 and settings.ort_threads == 3
    assert settings.batch_max_latency_ms == 3.0 and settings.triton_timeout == pytest.approx(3.001)


def test_unset_or_empty_variables_give_the_defaults() -> None:
    settings = ServeSettings.from_env({"ABSTAIN_WORKERS": "", "ABSTAIN_MODEL_DIR": "/m"})
    assert settings == ServeSettings(model_dir=Path("/m"))
    assert settings.workers == OPTION["workers"].default


@pytest.mark.parametrize(
    ("variable", "raw", "message"),
    [
        ("ABSTAIN_WORKERS", "two", "ABSTAIN_WORKERS should be an integer >= 1, but got 'two'"),
        ("ABSTAIN_WORKERS", "0", "ABSTAIN_WORKERS should be an integer >= 1, but got '0'"),
        ("ABSTAIN_TRITON_TIMEOUT", "nan", "TRITON_TIMEOUT should be a number >= 0.001, but got 'nan'"),
        ("ABSTAIN_BATCH_MAX_LATENCY_MS", "-1", "should be a number >= 0, but got '-1'"),
        ("ABSTAIN_BACKEND", "torch", "backend should be one of onnxruntime, triton, but got 'torch'"),
    ],
)
def test_bad_variables_are_refused_with_what_is_valid(variable: str, raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ServeSettings.from_env({variable: raw, "ABSTAIN_MODEL_DIR": "/m"})


def test_threads_follow_the_usable_cpus_shared_by_workers() -> None:
    # usable CPUs: the affinity mask capped by the cgroup CPU quota (a container run with --cpus,
    # a Kubernetes limit), as abstain.serving.config.cpus computes it; not the affinity count alone
    cpus = usable_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    assert ServeSettings(model_dir=Path("/m"), workers=1).intra_op_threads() == cpus
    assert ServeSettings(model_dir=Path("/m"), workers=2).intra_op_threads() == max(1, cpus // 2)
    assert ServeSettings(model_dir=Path("/m"), workers=cpus * 2).intra_op_threads() == 1
    assert ServeSettings(model_dir=Path("/m"), ort_threads=5).intra_op_threads() == 5


def test_threads_follow_a_cgroup_quota_below_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # a pod limited to 2.5 CPUs on a 64-core node: the quota wins (rounded up), shared by the workers
    monkeypatch.setattr(cpus_module, "cgroup_cpu_quota", lambda *_: 2.5)
    monkeypatch.setattr(cpus_module.os, "sched_getaffinity", lambda _: set(range(64)))
    assert ServeSettings(model_dir=Path("/m"), workers=1).intra_op_threads() == 3
    assert ServeSettings(model_dir=Path("/m"), workers=2).intra_op_threads() == 1
    assert ServeSettings(model_dir=Path("/m"), workers=4).intra_op_threads() == 1
    assert ServeSettings(model_dir=Path("/m"), ort_threads=5).intra_op_threads() == 5


def test_cli_options_are_built_from_the_table() -> None:
    app = typer.Typer()
    app.command()(serve)
    command = typer.main.get_command(app)
    params = {p.name: p for p in command.params}
    for option in OPTIONS:
        param = params[option.name]
        assert param.envvar == option.env, option.name
        if option.name != "model_dir":
            assert param.default == option.default, option.name
            assert option.flag in param.opts, option.name
            assert param.help == option.help, option.name
        if option.minimum is not None:
            assert param.min == option.minimum, option.name


def test_docs_show_the_generated_table() -> None:
    text = (ROOT / "docs" / "serving.md").read_text()
    block = re.search(r"<!-- settings-table: .*? -->\n(.*?)\n<!-- /settings-table -->", text, re.DOTALL)
    assert block is not None, "docs/serving.md lost its settings table markers"
    # regenerate with: python -c 'from abstain.serving.config.options import markdown_table as t; print(t())'
    assert block.group(1) == markdown_table()


def test_option_names_its_variable_and_flag() -> None:
    option = Option("batch_max_size", int, 64, "h", minimum=1)
    assert (option.env, option.flag) == ("ABSTAIN_BATCH_MAX_SIZE", "--batch-max-size")
