"""The Open Inference Protocol's (KServe v2) HTTP tensors: JSON, and the binary tensor data extension.

An inference request is a JSON header, optionally followed by raw tensor bytes when the request
carries ``Inference-Header-Content-Length`` (the header's length): each input with a
``binary_data_size`` parameter takes that many bytes, in the order of the inputs, little-endian, and
a BYTES element is a 4-byte little-endian length followed by its bytes. Responses are built the same
way, an output in binary when asked for (its ``binary_data`` parameter, else the request's
``binary_data_output``). Everything a client sends is checked against the body it came in: every
problem is a :class:`V2Error` naming the input, the expected and the actual value, never a numpy or
struct exception; no size read from the request allocates more than the body already holds.

Hand-written on purpose (docs/serve.md, "Why not a library"): the maintained implementations are
the `kserve` SDK (a whole model server with kubernetes, grpcio-tools and pandas in its
dependencies) and ``tritonclient.utils`` (a client package; its BYTES reader trusts the lengths it
reads). The tests check this codec against ``tritonclient.utils`` and ``tritonclient.http``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the protocol's numeric datatypes, as little-endian numpy dtypes (BYTES is handled apart)
NUMERIC = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
BYTES = "BYTES"
#: numpy kinds a JSON list may hold for each datatype kind (JSON numbers: int -> 'i', float -> 'f')
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_LENGTH = struct.Struct("<I")
HEADER_LENGTH = "Inference-Header-Content-Length"


class V2Error(Exception):
    """A request the v2 routes refuse: HTTP `status` and the message of the ``{"error": ...}`` answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def to_json(self) -> dict[str, str]:
        return {"error": self.message}


@dataclass(frozen=True)
class Tensor:
    """One input tensor: `data` is a numpy array of `shape`, or for BYTES a flat list of byte strings."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any


@dataclass(frozen=True)
class InferRequest:
    inputs: dict[str, Tensor]
    #: the requested outputs, name -> binary_data (None: not given), in the request's order; None: none named
    outputs: dict[str, bool | None] | None
    binary_data_output: bool = False
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- BYTES elements -------------------------------------------------------------------------------
def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary encoding: each a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def deserialize_bytes(buffer: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """Exactly `count` length-prefixed BYTES elements filling `buffer`, or a :class:`V2Error`."""
    items, offset, size = [], 0, len(buffer)
    for i in range(count):
        if size - offset < _LENGTH.size:
            raise V2Error(400, f"input {name!r}: binary data ends before the length of element {i} of {count}")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += _LENGTH.size
        if length > size - offset:
            raise V2Error(
                400, f"input {name!r}: element {i} says {length} bytes, only {size - offset} are left in its data"
            )
        items.append(bytes(buffer[offset : offset + length]))
        offset += length
    if offset != size:
        raise V2Error(400, f"input {name!r}: {size - offset} bytes left after its {count} elements")
    return items


# -- requests -------------------------------------------------------------------------------------
def header_length(value: str | None, body_size: int) -> int:
    """The JSON header's length: the ``Inference-Header-Content-Length`` header, else the whole body."""
    if value is None:
        return body_size
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        raise V2Error(400, f"{HEADER_LENGTH} must be a byte count, got {value[:40]!r}")
    length = int(value)
    if length > body_size:
        raise V2Error(400, f"{HEADER_LENGTH} is {length} bytes, over the body's {body_size} bytes")
    return length


def _load_json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise V2Error(400, f"malformed JSON in the request ({type(exc).__name__}: {str(exc)[:200]})") from None


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise V2Error(400, f"input {name!r}: shape must be a list of non-negative integers, got {str(shape)[:80]}")
    return tuple(shape)


def _flatten_text(name: str, data: Any) -> list[bytes]:
    """A JSON BYTES tensor (strings, flat or nested) as UTF-8 bytes."""
    out: list[bytes] = []
    stack = [data] if not isinstance(data, list) else list(reversed(data))
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item.encode("utf-8", "surrogatepass"))
        else:
            raise V2Error(400, f"input {name!r}: BYTES data in JSON must be strings, got {type(item).__name__}")
    return out


def _json_numbers(name: str, datatype: str, data: Any, count: int) -> np.ndarray:
    dtype = NUMERIC[datatype]
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise V2Error(400, f"input {name!r}: data is not a regular (flat or row-major nested) list") from None
    if array.size != count:
        raise V2Error(400, f"input {name!r}: shape holds {count} elements, data has {array.size}")
    if count and array.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise V2Error(
            400, f"input {name!r}: {datatype} data must be JSON {'booleans' if dtype.kind == 'b' else 'numbers'}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(dtype).ravel()


def _tensor(spec: Any, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    """One input of the request's JSON, its data from JSON or from `binary` at `offset`; the new offset."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise V2Error(400, "every input must be an object with a string 'name'")
    name, datatype = spec["name"], spec.get("datatype")
    if datatype != BYTES and datatype not in NUMERIC:
        raise V2Error(400, f"input {name!r}: unknown datatype {str(datatype)[:40]!r}")
    shape = _shape(name, spec.get("shape"))
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        if "data" not in spec:
            raise V2Error(400, f"input {name!r} has neither 'data' nor a binary_data_size parameter")
        data = (
            _flatten_text(name, spec["data"])
            if datatype == BYTES
            else _json_numbers(name, datatype, spec["data"], count)
        )
        if datatype == BYTES and len(data) != count:
            raise V2Error(400, f"input {name!r}: shape holds {count} elements, data has {len(data)}")
        return Tensor(name, datatype, shape, data), offset
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise V2Error(400, f"input {name!r}: binary_data_size must be a non-negative integer")
    if "data" in spec:
        raise V2Error(400, f"input {name!r} has both 'data' and binary data")
    if size > len(binary) - offset:
        raise V2Error(400, f"input {name!r}: binary_data_size {size} runs past the end of the body")
    chunk = binary[offset : offset + size]
    if datatype == BYTES:
        return Tensor(name, datatype, shape, deserialize_bytes(chunk, count, name)), offset + size
    dtype = NUMERIC[datatype]
    if size != count * dtype.itemsize:
        raise V2Error(
            400, f"input {name!r}: shape {list(shape)} of {datatype} takes {count * dtype.itemsize} bytes, got {size}"
        )
    return Tensor(name, datatype, shape, np.frombuffer(chunk, dtype)), offset + size


def _outputs(specs: Any) -> dict[str, bool | None] | None:
    if specs is None:
        return None
    if not isinstance(specs, list):
        raise V2Error(400, "'outputs' must be a list")
    outputs: dict[str, bool | None] = {}
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise V2Error(400, "every requested output must be an object with a string 'name'")
        params = spec.get("parameters") or {}
        binary = params.get("binary_data") if isinstance(params, dict) else None
        if binary is not None and not isinstance(binary, bool):
            raise V2Error(400, f"output {spec['name']!r}: binary_data must be true or false")
        if spec["name"] in outputs:
            raise V2Error(400, f"output {spec['name']!r} is requested twice")
        outputs[spec["name"]] = binary
    return outputs


def parse_infer_request(body: bytes, header_length_value: str | None) -> InferRequest:
    """An inference request from its body and ``Inference-Header-Content-Length`` (None: JSON only)."""
    json_size = header_length(header_length_value, len(body))
    view = memoryview(body)
    header = _load_json(view[:json_size])
    if not isinstance(header, dict):
        raise V2Error(400, "the inference request must be a JSON object")
    specs = header.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise V2Error(400, "the inference request must have a non-empty 'inputs' list")
    binary, offset, inputs = view[json_size:], 0, {}
    for spec in specs:
        tensor, offset = _tensor(spec, binary, offset)
        if tensor.name in inputs:
            raise V2Error(400, f"input {tensor.name!r} is given twice")
        inputs[tensor.name] = tensor
    if offset != len(binary):
        raise V2Error(400, f"{len(binary) - offset} bytes of binary data beyond the inputs' binary_data_size")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error(400, "'parameters' must be an object")
    binary_out = params.get("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise V2Error(400, "binary_data_output must be true or false")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise V2Error(400, "'id' must be a string")
    return InferRequest(inputs, _outputs(header.get("outputs")), binary_out, request_id, params)


# -- responses ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One output tensor: `data` is a numpy array, or for BYTES a list of str."""

    name: str
    datatype: str
    data: Any
    shape: tuple[int, ...] = ()

    def dims(self) -> list[int]:
        return list(self.shape or np.shape(self.data))

    def as_json(self) -> list[Any]:
        return list(self.data) if self.datatype == BYTES else np.asarray(self.data).ravel().tolist()

    def as_binary(self) -> bytes:
        if self.datatype == BYTES:
            return serialize_bytes([s.encode("utf-8") for s in self.data])
        return np.ascontiguousarray(self.data, NUMERIC[self.datatype]).tobytes()


def encode_response(head: dict[str, Any], outputs: Sequence[tuple[Output, bool]]) -> tuple[bytes, int | None]:
    """The response body for `head` (model_name, model_version, id, ...) and (output, binary) pairs, and
    the JSON header's length when any output is binary (for ``Inference-Header-Content-Length``)."""
    entries, chunks = [], []
    for output, binary in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.dims()}
        if binary:
            chunk = output.as_binary()
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = output.as_json()
        entries.append(entry)
    text = json.dumps({**head, "outputs": entries}, separators=(",", ":")).encode()
    return (text + b"".join(chunks), len(text)) if chunks else (text, None)
