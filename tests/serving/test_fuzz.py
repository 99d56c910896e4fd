"""Property-based fuzzing of the real server's OpenAPI operations: no input gives a 5xx.

Bodies are drawn from the schema at ``/docs.json`` (pixel arrays of any depth, shape and
element type, optional operating point) and from arbitrary JSON and bytes; a few dozen
examples keep this well under a minute.
"""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.servers import Server

pytestmark = pytest.mark.server

scalars = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=20,
)
pixel_like = st.one_of(
    st.lists(
        st.lists(
            st.lists(st.lists(st.floats(-0.5, 1.5), min_size=8, max_size=8), min_size=8, max_size=8),
            min_size=1,
            max_size=1,
        ),
        min_size=0,
        max_size=3,
    ),
    st.lists(json_values, max_size=3),
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {"pixels": pixel_like}, optional={"operating_point": st.one_of(st.none(), st.text(max_size=12))}
    ),
    json_values,
)


def test_openapi_lists_the_endpoints(server: Server) -> None:
    paths = httpx.get(f"{server.url}/docs.json", timeout=10).json()["paths"]
    assert {"/predict", "/predict_image"} <= set(paths)
    assert "pixels" in str(paths["/predict"]["post"]["requestBody"])


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies, raw=st.binary(max_size=64), use_raw=st.booleans())
def test_no_input_gives_a_server_error(server: Server, body: object, raw: bytes, use_raw: bool) -> None:
    with server.client() as client:
        if use_raw:
            reply = client.post("/predict", content=raw, headers={"content-type": "application/json"})
            upload = client.post("/predict_image", files={"image": ("f.png", raw, "image/png")})
            assert upload.status_code < 500, upload.text
        else:
            reply = client.post("/predict", json=body)
    assert reply.status_code < 500, reply.text
    assert isinstance(reply.json(), dict | list)
