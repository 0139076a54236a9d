"""The on-device gather's graph, serialized without onnx, against onnx.helper and numpy.take."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtimes.take_graph import take_rows_model

onnx = pytest.importorskip("onnx")

FINE_LIKE = [("images", "tensor(float)"), ("global_attention", "tensor(float16)"), ("ids", "tensor(int64)")]


def _with_onnx_helper(inputs: list[tuple[str, str]]) -> bytes:
    """The graph as runtimes built it before it stopped importing onnx (one Gather per input)."""
    from onnx import TensorProto, helper

    types = {
        "tensor(float)": TensorProto.FLOAT,
        "tensor(float16)": TensorProto.FLOAT16,
        "tensor(int64)": TensorProto.INT64,
    }
    graph = helper.make_graph(
        [helper.make_node("Gather", [name, "rows"], [f"{name}_rows"], axis=0) for name, _ in inputs],
        "take_rows",
        [helper.make_tensor_value_info(name, types[t], None) for name, t in inputs]
        + [helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(f"{name}_rows", types[t], None) for name, t in inputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


@pytest.mark.parametrize("inputs", [FINE_LIKE, FINE_LIKE[:1], [("a" * 200, "tensor(float)")]])
def test_bytes_equal_onnx_helper(inputs):
    data = take_rows_model(inputs)
    assert data == _with_onnx_helper(inputs)  # the 200-character name needs a two-byte length varint
    model = onnx.load_from_string(data)
    assert [n.op_type for n in model.graph.node] == ["Gather"] * len(inputs)
    assert [i.name for i in model.graph.input] == [name for name, _ in inputs] + ["rows"]


def test_gathers_rows_like_numpy_take():
    from runtimes import ort_backend

    so = ort.SessionOptions()
    so.use_per_session_threads = not ort_backend._shared_pool  # the suite's process may hold the shared pool
    session = ort.InferenceSession(take_rows_model(FINE_LIKE), sess_options=so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {
        "images": rng.standard_normal((5, 3, 4, 4)).astype(np.float32),
        "global_attention": rng.standard_normal((5, 7)).astype(np.float16),
        "ids": rng.integers(0, 100, (5, 2)).astype(np.int64),
    }
    rows = np.array([4, 0, 2], dtype=np.int64)
    got = session.run(None, {**feeds, "rows": rows})
    assert [o.name for o in session.get_outputs()] == ["images_rows", "global_attention_rows", "ids_rows"]
    for (name, _), value in zip(FINE_LIKE, got, strict=True):
        assert value.dtype == feeds[name].dtype
        np.testing.assert_array_equal(value, np.take(feeds[name], rows, axis=0))


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="unsupported input types"):
        take_rows_model([("x", "tensor(bool)")])
