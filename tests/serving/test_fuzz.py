"""Fuzzing the real server's OpenAPI operations: no input gives a 5xx.

Two runs, both bounded so the module stays well under a minute: hand-written hypothesis
strategies modelled on the schema at ``/docs.json`` (pixel arrays of any depth, shape and
element type, optional operating point, arbitrary JSON and bytes), and a schema-based run in
which schemathesis generates requests that follow and that violate ``/docs.json`` for every
POST operation and checks ``not_a_server_error``.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

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


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        # found by the schema-based run below: BentoML 1.4 answered these 500
        ("multipart/form-data; boundary=b", b"--b\r\n-1.9--b--\r\n"),  # part without headers
        ("multipart/form-data", b"garbage"),  # no boundary
        ("application/x-www-form-urlencoded", b"image=http%3A%2F%2F127.0.0.1%2Fx.png"),  # a URL, not a file
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="operating_point"; filename="p"\r\n\r\n'
            b"\xff\r\n--b--\r\n",
        ),  # a file where a text field belongs
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
            + b"\0" * (12 * 1024 * 1024)
            + b"\r\n--b--\r\n",
        ),  # larger than the form limit: refused before it is all held in memory
    ],
    ids=["part-without-headers", "no-boundary", "url-not-file", "file-as-text-field", "oversized"],
)
def test_malformed_upload_forms_are_rejected(server: Server, content_type: str, body: bytes) -> None:
    before = server.metric("abstain_rejected_inputs_total", reason="bad_image")
    with server.client() as client:
        reply = client.post("/predict_image", content=body, headers={"content-type": content_type})
    assert reply.status_code == 400, reply.text
    assert reply.json()["reason"] == "bad_image"
    assert "valid: multipart/form-data" in reply.json()["error"]
    assert server.metric("abstain_rejected_inputs_total", reason="bad_image") == before + 1


# --- schema-based: schemathesis draws requests from the served OpenAPI description ----------
# (the programmatic API: schemathesis 4.32's lazy ``pytest.from_fixture`` loader breaks on
# pytest 9, which no longer has ``Node._nodeid``)

POST_PATHS = ("/predict", "/predict_image")


@pytest.fixture
def openapi_schema(server: Server) -> schemathesis.BaseSchema:
    """The real server's ``/docs.json``."""
    schema = schemathesis.openapi.from_url(f"{server.url}/docs.json")
    schema.config.update(base_url=server.url)
    return schema


def test_schema_fuzz_covers_every_post_operation(openapi_schema: schemathesis.BaseSchema) -> None:
    posts = {
        op.path for op in (r.ok() for r in openapi_schema.get_all_operations()) if op.method.upper() == "POST"
    }
    assert posts == set(POST_PATHS)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", POST_PATHS)
def test_schema_fuzz_gives_no_server_error(
    openapi_schema: schemathesis.BaseSchema, path: str, mode: schemathesis.GenerationMode
) -> None:
    """Requests that follow the schema (positive) and that violate it (negative): never a 5xx."""
    operation = openapi_schema[path]["POST"]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error], timeout=30)

    fuzz()
