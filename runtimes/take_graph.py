"""The tiny ONNX graph behind the on-device gather, serialized without the ``onnx`` package.

:meth:`runtimes.ort_backend.OrtBackend.take` gathers the rows of the images that go on to the fine
stage on the device where the coarse outputs live, with one ``Gather(axis=0)`` node per fine-graph
input. `runtimes` must not import ``onnx`` (the base install has only ONNX Runtime), so the model is
written here directly in protobuf's wire format: a handful of fields of ``ModelProto``, in field
order, exactly as ``onnx.helper`` would build and serialize it (``tests/test_take_graph.py`` checks
the bytes against ``onnx.helper`` and the semantics against ``numpy.take``).
"""

from __future__ import annotations

from collections.abc import Sequence

#: ONNX Runtime's input type strings -> ONNX ``TensorProto.DataType`` values.
ELEM_TYPES = {"tensor(float)": 1, "tensor(int64)": 7, "tensor(float16)": 10, "tensor(double)": 11}
ROWS = "rows"  #: the (n,) int64 input: which batch rows to keep, in order
IR_VERSION, OPSET = 8, 13


def output_name(name: str) -> str:
    """The gathered version of input `name`."""
    return f"{name}_rows"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, elem_type: int, dim_param: str | None = None) -> bytes:
    """ValueInfoProto{name, type{tensor_type{elem_type[, shape{dim{dim_param}}]}}}; no shape: any rank."""
    tensor = _int(1, elem_type)
    if dim_param is not None:
        tensor += _bytes(2, _bytes(1, _bytes(2, dim_param)))
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor))


def _gather_node(name: str) -> bytes:
    """NodeProto{input: [name, rows], output: [name_rows], op_type: Gather, attribute: axis=0 (INT)}."""
    axis = _bytes(1, "axis") + _int(3, 0) + _int(20, 2)
    return _bytes(1, name) + _bytes(1, ROWS) + _bytes(2, output_name(name)) + _bytes(4, "Gather") + _bytes(5, axis)


def take_rows_model(inputs: Sequence[tuple[str, str]]) -> bytes:
    """A serialized ModelProto gathering rows (axis 0) of each of `inputs` ((name, ORT type string)).

    Inputs: every name (any shape) and ``rows`` (int64, (n,)); outputs: ``<name>_rows`` in the same
    order and types. Opset 13, IR version 8.
    """
    unknown = sorted({t for _, t in inputs} - set(ELEM_TYPES))
    if unknown:
        raise ValueError(f"take_rows_model: unsupported input types {unknown}")
    graph = b"".join(_bytes(1, _gather_node(name)) for name, _ in inputs) + _bytes(2, "take_rows")
    graph += b"".join(_bytes(11, _value_info(name, ELEM_TYPES[t])) for name, t in inputs)
    graph += _bytes(11, _value_info(ROWS, ELEM_TYPES["tensor(int64)"], "n"))
    graph += b"".join(_bytes(12, _value_info(output_name(name), ELEM_TYPES[t])) for name, t in inputs)
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(7, graph) + _bytes(8, opset)
