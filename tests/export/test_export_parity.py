"""Parity of the exported graph with PyTorch for every body, and the graph's contract."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from abstain.contract import (
    INPUT_NAME,
    LOGITS_NAME,
    META_CHECKPOINT_SHA256,
    META_CLASS_NAMES,
    META_CODE_VERSION,
    META_EXPORT,
    META_INPUT_SPEC,
    META_TEST_METRICS,
    META_TRAIN_DATA_FINGERPRINT,
    META_TRAINING,
    SELECTION_LOGIT_NAME,
    SELECTION_NAME,
    InputSpec,
)
from abstain.export.onnx_export import export_graph
from abstain.export.pipeline import build_verified_graph
from abstain.export.verify import FP32_TOLERANCE, ParityError, Tolerance, verification_inputs, verify_parity
from abstain.runtime import OnnxModel
from abstain.training.checkpoint import model_from_checkpoint
from tests.export.export_helpers import checkpoint_dict


@pytest.mark.parametrize(
    ("body", "image_size", "in_channels", "dataset"),
    [
        ("small_cnn", 8, 1, "digits"),  # the shipped model's shape, checked on real digits
        ("vgg16_bn", 32, 3, "synthetic"),  # SelectiveNet's CIFAR body at its native 32×32
        ("resnet18", 64, 3, "synthetic"),  # small input keeps the test fast on 2 cores
    ],
)
def test_every_body_exports_within_tolerance_and_loads_in_serving(
    tmp_path, body, image_size, in_channels, dataset
):
    checkpoint = checkpoint_dict(body=body, image_size=image_size, in_channels=in_channels, dataset=dataset)
    model_bytes, report = build_verified_graph(checkpoint, "ab" * 32)

    assert report.max_abs_logits <= 1e-4 and report.max_abs_selection <= 1e-4
    assert report.batch_sizes == (1, 64)
    assert report.inputs == ("digits/test" if dataset == "digits" else "synthetic uniform noise")

    path = tmp_path / "model.onnx"
    path.write_bytes(model_bytes)
    served = OnnxModel(path, intra_op_threads=1, prefer_cuda=False)
    assert served.input_spec == InputSpec(
        in_channels, image_size, image_size, (0.5,) * in_channels, (0.25,) * in_channels
    )
    assert served.class_names == checkpoint["class_names"]
    # dynamic batch: a size never seen at export time, compared with PyTorch again
    x = np.random.default_rng(1).random((5, in_channels, image_size, image_size), dtype=np.float32)
    out = served.run_batched(x)
    model = model_from_checkpoint(checkpoint)
    import torch

    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    assert out.logits.shape == (5, 10) and out.selection.shape == (5,)
    np.testing.assert_allclose(out.logits, ref.logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(out.selection, ref.selection.numpy(), rtol=0, atol=1e-4)
    assert ((out.selection >= 0) & (out.selection <= 1)).all()
    assert out.selection_logit is not None  # issue 10: the exported graph carries g's logit
    np.testing.assert_allclose(out.selection_logit, ref.selection_logit.numpy(), rtol=0, atol=1e-4)


def test_graph_has_contract_names_dynamic_batch_no_aux_head_and_metadata():
    checkpoint = checkpoint_dict()
    model_bytes, _ = build_verified_graph(checkpoint, "ab" * 32)
    proto = onnx.load_from_string(model_bytes)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in proto.graph.input] == [(INPUT_NAME, ["batch", 1, 8, 8])]
    assert [(v.name, dims(v)) for v in proto.graph.output] == [
        (LOGITS_NAME, ["batch", 10]),
        (SELECTION_NAME, ["batch"]),
        (SELECTION_LOGIT_NAME, ["batch"]),
    ]
    assert not [i.name for i in proto.graph.initializer if "auxiliary" in i.name]  # head h is pruned
    assert proto.ir_version == 8 and proto.opset_import[0].version == 18
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)

    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[META_CLASS_NAMES]) == [str(i) for i in range(10)]
    assert json.loads(meta[META_INPUT_SPEC])["mean"] == [0.5]
    assert json.loads(meta[META_TRAINING]) == {
        "beta": 1.0,
        "dataset": "digits",
        "loss": "sync",
        "target_coverage": 0.8,
    }
    assert meta[META_CHECKPOINT_SHA256] == "ab" * 32
    assert meta[META_TRAIN_DATA_FINGERPRINT] == "f" * 64
    assert json.loads(meta[META_TEST_METRICS]) == {"accuracy": 0.97, "split": "test"}
    assert meta[META_CODE_VERSION].startswith("0.1.0")
    export_info = json.loads(meta[META_EXPORT])
    assert export_info["precision"] == "fp32" and export_info["training_code_version"] == "0.1.0+gtest"


def test_parity_check_fails_with_the_numbers_on_a_wrong_graph():
    spec = InputSpec(1, 8, 8, (0.5,), (0.25,))
    model = model_from_checkpoint(checkpoint_dict(seed=0))
    other = model_from_checkpoint(checkpoint_dict(seed=1))  # same architecture, other weights
    wrong = export_graph(other, spec).SerializeToString()
    x, source = verification_inputs(spec, "digits")
    with pytest.raises(
        ParityError, match=r"logits at batch size 64: max abs diff \d.*selection at batch size 1"
    ):
        verify_parity(model, wrong, x, source)


def test_parity_reports_its_worst_difference_and_honours_the_tolerance():
    spec = InputSpec(1, 8, 8, (0.5,), (0.25,))
    model = model_from_checkpoint(checkpoint_dict())
    graph = export_graph(model, spec).SerializeToString()
    x, _ = verification_inputs(spec, None)
    report = verify_parity(model, graph, x, "noise", FP32_TOLERANCE)
    assert 0 <= report.max_abs_logits <= 1e-4
    # a tolerance below the measured difference must fail: the check really compares numbers
    if report.max_abs_logits > 0:
        with pytest.raises(ParityError, match="max abs diff"):
            verify_parity(model, graph, x, "noise", Tolerance(atol=report.max_abs_logits / 2))


def test_verification_inputs_are_real_digits_plus_extremes_or_noise():
    spec = InputSpec(1, 8, 8)
    x, source = verification_inputs(spec, "digits")
    assert source == "digits/test" and x.shape == (64, 1, 8, 8) and x.dtype == np.float32
    assert (x[-2] == 0).all() and (x[-1] == 1).all()
    rgb = InputSpec(3, 32, 32, (0.0,) * 3, (1.0,) * 3)  # not the digits' shape
    x2, source2 = verification_inputs(rgb, "digits")
    assert source2 == "synthetic uniform noise" and x2.shape == (64, 3, 32, 32)
    assert x2.min() >= 0 and x2.max() <= 1


def test_optimized_and_fp16_graphs_pass_their_verification(tmp_path):
    checkpoint = checkpoint_dict()
    optimized, report = build_verified_graph(checkpoint, "ab" * 32, optimize=True)
    assert report.max_abs_logits <= 1e-4 and report.max_abs_selection <= 1e-4
    half, report16 = build_verified_graph(checkpoint, "ab" * 32, fp16=True)
    assert report16.tolerance.atol == 1e-2
    assert report16.max_abs_selection <= 1e-2
    proto16 = onnx.load_from_string(half)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto16.graph.initializer)
    for name, data in (("opt", optimized), ("fp16", half)):
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        served = OnnxModel(path, prefer_cuda=False)  # contract names and metadata survive
        assert served.class_names == checkpoint["class_names"]
        assert json.loads(served.metadata[META_EXPORT])["precision"] == ("fp16" if name == "fp16" else "fp32")
