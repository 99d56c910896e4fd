"""``abstain predict`` on a PNG folder answers as the running service does, image by image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from abstain.calibration.predict import run_predict
from tests.digits import load_digits
from tests.serving.servers import MODEL_DIR, Server


def test_offline_decisions_equal_the_real_service(server: Server, tmp_path: Path) -> None:
    test = load_digits("test")
    root = tmp_path / "pngs"
    root.mkdir()
    for i in range(40):
        Image.fromarray(np.round(test.x[i, 0] * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
    out = tmp_path / "decisions.jsonl"
    summary = run_predict(MODEL_DIR, out, input_path=root, batch_size=16)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.images == 40 and len(records) == 40
    with server.client() as client:
        for r in records:
            data = (root / r["input"]).read_bytes()
            reply = client.post("/predict_image", files={"image": (r["input"], data, "image/png")})
            assert reply.status_code == 200, reply.text
            (answer,) = reply.json()["predictions"]
            assert answer["decision"] == r["decision"]
            assert answer["operating_point"] == r["operating_point"]
            assert answer["score_value"] == r["score_value"]  # the same float, not just close
            top = answer.get("class_index", answer.get("candidate", {}).get("class_index"))
            assert top == r["class_index"]
