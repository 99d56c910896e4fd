"""ONNX Runtime's CUDA provider against its CPU provider, on a graph and through the service.

On a machine with an NVIDIA GPU and the GPU build of ONNX Runtime (``pip install
'.[serve-gpu]'`` in an environment of its own; ``onnxruntime-gpu`` must not sit beside
``onnxruntime``), this

1. runs the graph (default: the shipped ``models/digits``) on the digits test split with the
   CUDA provider and with the CPU provider, and reports the largest differences of ``logits``
   and ``selection`` and how many decisions of each operating point differ;
2. starts ``abstain serve`` on 127.0.0.1, checks that ``/metadata`` names
   ``CUDAExecutionProvider``, and compares the service's decisions with the CPU provider's;

and writes the figures under ``## GPU`` in docs/benchmarks.md with the GPU's name. Without a
CUDA provider it says so and writes nothing (a CPU run says nothing about the CUDA path).

    python benchmarks/cuda_parity.py                       # on a GPU machine
    python benchmarks/cuda_parity.py --model-dir models/digits/1 --port 3100
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from abstain.contract import MODEL_FILENAME, resolve_version_dir
from abstain.decisions import decide_arrays
from abstain.io import atomic_write_text
from abstain.operating_points import load_calibration
from abstain.runtime import OnnxModel

ROOT = Path(__file__).resolve().parents[1]


def digits_test() -> np.ndarray:
    """The digits test split (scikit-learn if installed, else the tests' copy)."""
    from abstain.datasets import load_digits

    try:
        return load_digits("test").x  # imports scikit-learn, which a serve-gpu environment lacks
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from tests.digits import load_digits as load_copy

        return load_copy("test").x


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "digits")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(
            f"no CUDA provider in onnxruntime {ort.__version__} ({ort.get_available_providers()}): "
            "install the serve-gpu extra on a machine with an NVIDIA GPU; nothing written"
        )
        sys.exit(1)
    version_dir = resolve_version_dir(args.model_dir)
    calibration = load_calibration(version_dir / "calibration.json")
    x = digits_test()
    cpu = OnnxModel(version_dir / MODEL_FILENAME, prefer_cuda=False)
    cuda = OnnxModel(version_dir / MODEL_FILENAME, prefer_cuda=True)
    if cuda.providers[0] != "CUDAExecutionProvider":
        print(f"the session fell back to {cuda.providers}: nothing written")
        sys.exit(1)
    a, b = cpu.run_batched(x), cuda.run_batched(x)
    logits_diff = float(np.abs(a.logits - b.logits).max())
    selection_diff = float(np.abs(a.selection - b.selection).max())
    flips = {
        p.name: int(
            (
                decide_arrays(a.logits, a.selection, p, a.selection_logit).answered
                != decide_arrays(b.logits, b.selection, p, b.selection_logit).answered
            ).sum()
        )
        for p in calibration.operating_points
    }

    env = dict(os.environ, ABSTAIN_WORKERS="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "abstain", "serve", str(version_dir), "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not become ready") from None
                time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/metadata", timeout=10) as reply:
            provider = json.loads(reply.read())["execution_provider"]
        served = []
        for i in range(0, len(x), 128):
            served += post(f"{url}/predict", {"pixels": x[i : i + 128].tolist()})["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
    reference = decide_arrays(a.logits, a.selection, calibration.operating_point(None), a.selection_logit)
    answered = [u["decision"] == "predict" for u in served]
    service_flips = sum(r != s for r, s in zip(reference.answered.tolist(), answered, strict=True))

    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        or "an NVIDIA GPU"
    )
    lines = [
        f"`python benchmarks/cuda_parity.py` on {gpu}, onnxruntime-gpu {ort.__version__}, "
        f"graph {version_dir.relative_to(ROOT) if version_dir.is_relative_to(ROOT) else version_dir}, "
        f"digits test split ({len(x)} images):",
        "",
        f"- CUDA vs CPU provider: max |Δ logits| {logits_diff:.2e}, max |Δ selection| {selection_diff:.2e}; "
        "decisions that differ: " + ", ".join(f"{k} {v}" for k, v in flips.items()),
        f"- `abstain serve` reported `{provider}` in /metadata; its decisions at the default operating "
        f"point differ from the CPU provider's on {service_flips} of {len(x)} images",
    ]
    print("\n".join(lines))
    section = "## GPU\n\n" + "\n".join(lines) + "\n\n"
    text = args.doc.read_text()
    pattern = re.compile(r"^## GPU\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    atomic_write_text(args.doc, text)


if __name__ == "__main__":
    main()
