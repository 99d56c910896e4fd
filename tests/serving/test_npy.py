"""``POST /predict`` with a ``.npy`` body: the same checks, errors and answers as JSON.

Parsing is checked against ``np.load(allow_pickle=False)`` directly; the endpoint against the
real ``bentoml serve`` (the shared 2-worker server of conftest.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from abstain.contract import InputSpec
from abstain.serving.http.validation import NPY_MEDIA_TYPE, InputRejectedError, parse_npy
from tests.digits import load_digits
from tests.serving.servers import Server

SPEC = InputSpec(1, 8, 8)
NPY = {"content-type": NPY_MEDIA_TYPE}


def npy(x: np.ndarray, **save: bool) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, **save)
    return buf.getvalue()


@pytest.mark.parametrize(
    "x",
    [
        np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32),
        np.random.default_rng(1).random((1, 8, 8), dtype=np.float32),  # one image
        np.asfortranarray(np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32)),
        np.random.default_rng(3).random((2, 1, 8, 8)).astype(">f4"),  # big-endian
    ],
)
def test_float32_npy_reads_as_np_load(x: np.ndarray) -> None:
    got = parse_npy(npy(x), SPEC, max_batch=4)
    want = np.load(io.BytesIO(npy(x)), allow_pickle=False).reshape(-1, 1, 8, 8)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_uint8_npy_is_scaled_to_unit_range() -> None:
    x = np.array([0, 1, 128, 255] * 16, dtype=np.uint8).reshape(1, 1, 8, 8)
    got = parse_npy(npy(x), SPEC, max_batch=4)
    assert got.dtype == np.float32
    f255 = np.float32(255)
    assert got[0, 0, 0].tolist() == [0.0, float(np.float32(1) / f255), float(np.float32(128) / f255), 1.0] * 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "bad_npy"),
        (b"not an npy file at all", "bad_npy"),
        (npy(np.zeros((1, 1, 8, 8), np.float32))[:-3], "bad_npy"),  # truncated
        (npy(np.zeros((1, 1, 8, 8), np.float32)) + b"\0" * 4, "bad_npy"),  # padded
        (npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "bad_dtype"),  # a pickle
        (npy(np.zeros((1, 1, 8, 8))), "bad_dtype"),  # float64
        (npy(np.zeros((1, 1, 8, 8), np.int32)), "bad_dtype"),
        (npy(np.zeros((1, 1, 8, 7), np.float32)), "bad_shape"),
        (npy(np.zeros((64,), np.float32)), "bad_shape"),
        (npy(np.zeros((0, 1, 8, 8), np.float32)), "empty_batch"),
        (npy(np.zeros((5, 1, 8, 8), np.float32)), "batch_too_large"),
        (npy(np.full((1, 1, 8, 8), np.nan, np.float32)), "non_finite"),
        (npy(np.full((1, 1, 8, 8), 1.5, np.float32)), "out_of_range"),
    ],
)
def test_bad_npy_bodies_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(InputRejectedError) as caught:
        parse_npy(body, SPEC, max_batch=4)
    assert caught.value.reason == reason
    assert "valid:" in caught.value.message


def test_npy_header_is_parsed_once_per_distinct_header() -> None:
    """The header of a shape seen before is not parsed again (numpy's literal_eval costs ~50 µs)."""
    from abstain.serving.http.validation import _npy_header

    x = np.random.default_rng(4).random((3, 1, 8, 8), dtype=np.float32)
    parse_npy(npy(x), SPEC, max_batch=4)
    before = _npy_header.cache_info()
    got = parse_npy(npy(x * 0.5), SPEC, max_batch=4)  # same header, other pixels
    after = _npy_header.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)
    np.testing.assert_array_equal(got, x * 0.5)  # the pixels are the new body's, not cached


def test_npy_format_2_and_lying_header_lengths() -> None:
    x = np.random.default_rng(5).random((2, 1, 8, 8), dtype=np.float32)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x, version=(2, 0))
    np.testing.assert_array_equal(parse_npy(buf.getvalue(), SPEC, max_batch=4), x)
    body = bytearray(npy(x))
    for length in (0, 3, len(body)):  # the 2-byte header length of format 1.0 says something else
        body[8:10] = length.to_bytes(2, "little")
        with pytest.raises(InputRejectedError) as caught:
            parse_npy(bytes(body), SPEC, max_batch=4)
        assert caught.value.reason == "bad_npy"


def test_npy_answers_equal_json_answers(server: Server) -> None:
    x = load_digits("test").x[:40]
    with server.client() as client:
        as_json = client.post("/predict", json={"pixels": x.tolist(), "operating_point": "coverage-0.9"})
        as_npy = client.post("/predict?operating_point=coverage-0.9", content=npy(x), headers=NPY)
        one = client.post("/predict", content=npy(x[0]), headers=NPY)  # [C, H, W]
    assert as_json.status_code == as_npy.status_code == one.status_code == 200, as_npy.text
    assert without_ids(as_npy.json()) == without_ids(as_json.json())
    assert (
        without_ids(one.json())["predictions"]
        == without_ids({"predictions": client_default(server, x[:1])})["predictions"]
    )
    # request ids, one per image, go in the query string
    with server.client() as client:
        named = client.post("/predict?request_id=img-a&request_id=img-b", content=npy(x[:2]), headers=NPY)
    assert [p["request_id"] for p in named.json()["predictions"]] == ["img-a", "img-b"]


def without_ids(answer: dict) -> dict:
    """The answer without the per-image request ids (made afresh for every request)."""
    return {
        **answer,
        "predictions": [{k: v for k, v in p.items() if k != "request_id"} for p in answer["predictions"]],
    }


def client_default(server: Server, x: np.ndarray) -> list[dict]:
    with server.client() as client:
        return client.post("/predict", json={"pixels": x.tolist()}).json()["predictions"]


def test_bad_npy_bodies_get_4xx_json_and_are_counted(server: Server) -> None:
    before = server.metric("abstain_rejected_inputs_total", reason="bad_npy")
    before_op = server.metric("abstain_rejected_inputs_total", reason="unknown_operating_point")
    with server.client() as client:
        garbage = client.post("/predict", content=b"\x93NUMPY garbage", headers=NPY)
        pickle = client.post(
            "/predict", content=npy(np.array([1, None], dtype=object), allow_pickle=True), headers=NPY
        )
        zeros = npy(np.zeros((1, 8, 8), np.float32))
        op = client.post("/predict?operating_point=nope", content=zeros, headers=NPY)
    assert garbage.status_code == 400 and garbage.json()["reason"] == "bad_npy"
    assert pickle.status_code == 400 and pickle.json()["reason"] == "bad_dtype"
    assert op.status_code == 400 and "coverage-0.9" in op.json()["error"]
    assert server.metric("abstain_rejected_inputs_total", reason="bad_npy") - before == 1
    assert server.metric("abstain_rejected_inputs_total", reason="unknown_operating_point") - before_op == 1
