"""The KServe v2 codec (cfvit_deploy/app/serve/v2_codec.py) against NVIDIA's own implementation
(`tritonclient.utils`, `tritonclient.http.InferResult`), and at its worst: any bytes in, a V2Error out."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cfvit_deploy.app.serve.v2_codec import (
    Output,
    V2Error,
    deserialize_bytes,
    encode_response,
    parse_infer_request,
    serialize_bytes,
)

tritonutils = pytest.importorskip("tritonclient.utils")


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None)
def test_bytes_elements_match_tritonclient(items):
    ours = serialize_bytes(items)
    theirs = tritonutils.serialize_byte_tensor(np.array(items + [b""], dtype=np.object_)[:-1]).item()
    assert ours == theirs  # NVIDIA's encoding, byte for byte (a trailing b"" keeps numpy from trimming)
    assert deserialize_bytes(ours, len(items), "X") == list(tritonutils.deserialize_bytes_tensor(ours))


@pytest.mark.parametrize(
    ("buffer", "count", "words"),
    [
        (b"\x05\x00\x00\x00abc", 1, "only 3 are left"),  # a length past the end (tritonclient trusts it)
        (b"\x01\x00", 1, "ends before the length"),
        (b"\x01\x00\x00\x00a\x00\x00\x00\x00", 1, "4 bytes left"),
        (b"\xff\xff\xff\xff", 1, "only 0 are left"),  # 4 GiB promised: nothing is allocated for it
    ],
)
def test_bytes_elements_are_checked_against_their_buffer(buffer, count, words):
    with pytest.raises(V2Error) as info:
        deserialize_bytes(buffer, count, "IMAGE")
    assert info.value.status == 400 and words in info.value.message and "'IMAGE'" in info.value.message


def test_response_reads_back_with_tritonclient_in_both_encodings():
    from tritonclient.http import InferResult

    outputs = [
        (Output("LABEL", "BYTES", ["cat", "dög"]), True),
        (Output("PROBABILITY", "FP32", np.array([0.5, 0.25], np.float32)), False),
        (Output("REFINED_PATCHES", "INT64", np.array([[3, 1], [-1, -1]], np.int64)), True),
        (Output("STAGE", "BYTES", ["fine", "coarse"]), False),
    ]
    body, header_length = encode_response({"model_name": "m", "model_version": "1", "id": "7"}, outputs)
    result = InferResult.from_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "7"
    assert result.as_numpy("LABEL").tolist() == [b"cat", "dög".encode()]
    np.testing.assert_array_equal(result.as_numpy("PROBABILITY"), [0.5, 0.25])
    np.testing.assert_array_equal(result.as_numpy("REFINED_PATCHES"), [[3, 1], [-1, -1]])
    assert result.as_numpy("STAGE").tolist() == ["fine", "coarse"]  # JSON BYTES arrive as text
    json_only, none = encode_response({"model_name": "m"}, [(o, False) for o, _ in outputs])
    assert none is None and json.loads(json_only)["outputs"][2]["data"] == [3, 1, -1, -1]


def test_request_with_binary_and_json_inputs():
    blob = serialize_bytes([b"\x89PNG...", b"\xff\xd8"])
    header = json.dumps(
        {
            "id": "a",
            "inputs": [
                {"name": "IMAGE", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}},
                {"name": "ETA", "datatype": "FP32", "shape": [1], "data": [[0.25]]},  # nested is row-major too
            ],
            "outputs": [{"name": "LOGITS", "parameters": {"binary_data": False}}, {"name": "STAGE"}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    request = parse_infer_request(header + blob, str(len(header)))
    assert request.inputs["IMAGE"].data == [b"\x89PNG...", b"\xff\xd8"]
    assert request.inputs["ETA"].data.dtype == np.float32 and request.inputs["ETA"].data.tolist() == [0.25]
    assert request.outputs == {"LOGITS": False, "STAGE": None} and request.binary_data_output and request.id == "a"


@given(st.binary(max_size=300), st.integers(min_value=-2, max_value=400))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_a_request_or_a_400(body, cut):
    try:
        parse_infer_request(body, None if cut < 0 else str(cut))
    except V2Error as exc:
        assert exc.status == 400 and exc.message


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    ["name", "datatype", "shape", "data", "parameters", "binary_data_size", "inputs", "outputs"]
                ),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_any_json_is_a_request_or_a_400(value):
    body = json.dumps({"inputs": value}).encode()
    try:
        parse_infer_request(body, None)
    except V2Error as exc:
        assert exc.status == 400 and exc.message
