"""``abstain predict --engine ray`` against a real local Ray cluster: the same decisions as
``abstain predict``, row by row; unreadable files as error rows; a killed actor retried with
every row written once; a failed job leaves nothing at its path; a two-node cluster."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pq = pytest.importorskip("pyarrow.parquet")

from PIL import Image  # noqa: E402

from abstain.calibration.predict import run_predict  # noqa: E402
from abstain.calibration.ray_engine import run_predict_ray  # noqa: E402
from abstain.calibration.selector import Selector  # noqa: E402
from abstain.datasets import load_digits  # noqa: E402
from abstain.operating_points import load_calibration  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.server]

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "digits"
#: Actors of a local cluster of two CPUs: two of 0.75 leave room for the read and write tasks.
CPUS_PER_ACTOR = 0.75


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of two CPUs for the module's tests (the engine uses it, not its own)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_test(tmp_path_factory) -> Path:
    """The digits test split as an ``.npz`` (x float [N, 1, 8, 8], y [N])."""
    split = load_digits("test")
    path = tmp_path_factory.mktemp("npz") / "digits-test.npz"
    np.savez(path, x=split.x, y=split.y)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder tree of 120 digits test images (PNG) plus two files that are not images."""
    split = load_digits("test")
    root = tmp_path_factory.mktemp("images")
    for i in range(120):
        folder = root / str(int(split.y[i]))
        folder.mkdir(exist_ok=True)
        Image.fromarray((split.x[i, 0] * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
    (root / "3" / "truncated.png").write_bytes((root / "3").glob("*.png").__next__().read_bytes()[:40])
    (root / "5" / "notes.jpg").write_text("not a JPEG")
    return root


def read(path: Path) -> dict[str, dict]:
    """Records by input id; every id must occur once."""
    rows = pq.read_table(path).to_pylist()
    by_id = {r["input"]: r for r in rows}
    assert len(by_id) == len(rows), "an input was written twice"
    return by_id


def assert_same_records(ray_out: Path, plain_out: Path) -> None:
    """Row by row: the decisions, classes, scores and thresholds of the two engines agree."""
    got, want = read(ray_out), read(plain_out)
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        for column in ("decision", "label", "candidate", "class_index", "operating_point", "true_label"):
            assert g[column] == w[column], (key, column)
        if w["decision"] != "error":
            assert g["score_value"] == pytest.approx(w["score_value"], abs=1e-6), key
            assert g["threshold"] == w["threshold"]


def test_decisions_equal_abstain_predict_at_every_operating_point(local_ray, digits_test, tmp_path):
    points = load_calibration(MODEL_DIR / "1" / "calibration.json").names
    assert len(points) >= 2
    answered = []
    for name in points:
        plain = run_predict(
            MODEL_DIR, tmp_path / f"{name}.parquet", input_path=digits_test, operating_point=name
        )
        summary = run_predict_ray(
            MODEL_DIR,
            tmp_path / name,
            input_path=digits_test,
            operating_point=name,
            batch_size=64,
            concurrency=2,
            cpus_per_actor=CPUS_PER_ACTOR,
            progress=False,
        )
        assert_same_records(tmp_path / name, tmp_path / f"{name}.parquet")
        assert (summary.images, summary.answered, summary.answered_correct, summary.labelled) == (
            plain.images,
            plain.answered,
            plain.answered_correct,
            plain.labelled,
        )
        assert summary.images == 360
        answered.append(summary.answered)
    assert min(answered) < 360, "no point abstains: abstentions were not compared"


def test_unreadable_files_are_error_rows_of_a_finished_job(local_ray, image_folder, tmp_path):
    plain = run_predict(MODEL_DIR, tmp_path / "plain.parquet", input_path=image_folder)
    summary = run_predict_ray(
        MODEL_DIR, tmp_path / "out", input_path=image_folder, batch_size=16, concurrency=2,
        cpus_per_actor=CPUS_PER_ACTOR, progress=False,
    )  # fmt: skip
    assert_same_records(tmp_path / "out", tmp_path / "plain.parquet")
    rows = read(tmp_path / "out")
    assert {k for k, r in rows.items() if r["decision"] == "error"} == {"3/truncated.png", "5/notes.jpg"}
    assert "not a readable image" in rows["5/notes.jpg"]["error"]
    assert summary.errors == 2 and summary.images == 122 and summary.labelled == 120
    assert summary.selective_risk == plain.selective_risk


class CrashOnce(Selector):
    """Kills its own process on its first batch, once per :attr:`marker` file: a lost actor."""

    marker = ""  # set by the test; the class travels to the actors by value, with it

    def records(self, batch):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().records(batch)
        os.close(fd)
        os._exit(1)


class AlwaysFails(Selector):
    def records(self, batch):
        raise RuntimeError("a bug in the user's selector")


def test_a_killed_actor_is_retried_and_every_row_written_once(local_ray, digits_test, tmp_path):
    marker = tmp_path / "crashed"
    CrashOnce.marker = str(marker)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors need not import tests/
    run_predict_ray(
        MODEL_DIR, tmp_path / "out", input_path=digits_test, batch_size=32, concurrency=2,
        cpus_per_actor=CPUS_PER_ACTOR, progress=False, selector_class=CrashOnce,
    )  # fmt: skip
    assert marker.exists(), "no actor crashed: the test did not test a retry"
    run_predict(MODEL_DIR, tmp_path / "plain.parquet", input_path=digits_test)
    assert_same_records(tmp_path / "out", tmp_path / "plain.parquet")
    assert len(read(tmp_path / "out")) == 360


def test_a_failed_job_leaves_nothing_at_its_path(local_ray, digits_test, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(Exception, match="a bug in the user's selector"):
        run_predict_ray(
            MODEL_DIR, tmp_path / "out", input_path=digits_test, batch_size=64,
            cpus_per_actor=CPUS_PER_ACTOR, progress=False, selector_class=AlwaysFails,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


def test_refuses_an_existing_output_and_a_single_file_format(local_ray, digits_test, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        run_predict_ray(MODEL_DIR, tmp_path / "out", input_path=digits_test, progress=False)
    with pytest.raises(ValueError, match=r"a folder of Parquet partitions, not one \.jsonl or \.csv file"):
        run_predict_ray(MODEL_DIR, tmp_path / "d.jsonl", input_path=digits_test, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def two_node_cluster():
    """A head and a second node started with ``ray start`` on 127.0.0.1, one CPU each."""
    if ray.is_initialized():
        ray.shutdown()
    # Ray's sockets live under its temp dir: a pytest tmp_path is too long for a socket's path
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = free_port()
    # Ray's token authentication (its default for `ray start`): every node and the driver
    # share the token through the environment, as a cluster's pods would
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [ray_bin, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--include-dashboard", "false", "--temp-dir", temp_dir, *common],
            check=True, env=env, timeout=180, capture_output=True,
        )  # fmt: skip
        subprocess.run(
            [ray_bin, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1", *common],
            check=True, env=env, timeout=180, capture_output=True,
        )  # fmt: skip
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, timeout=120, capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_cli_on_a_two_node_cluster(two_node_cluster, digits_test, tmp_path):
    """Two actors of 0.75 CPU cannot share a node of one CPU: one runs on each node."""
    address, env = two_node_cluster
    abstain = Path(sys.executable).parent / "abstain"
    done = subprocess.run(
        [str(abstain), "predict", str(MODEL_DIR), str(digits_test), "--engine", "ray",
         "--address", address, "--concurrency", "2", "--cpus-per-actor", str(CPUS_PER_ACTOR),
         "--batch-size", "64", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    plain = run_predict(MODEL_DIR, tmp_path / "plain.parquet", input_path=digits_test)
    assert_same_records(tmp_path / "out", tmp_path / "plain.parquet")
    assert f"360 inputs at operating point {plain.operating_point}: {plain.answered} answered" in done.stdout
