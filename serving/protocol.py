"""The serving contract shared by the exporter (which writes it) and the server and client (which read it).

Signatures of every exported version (``saved_model_cli show --dir <version> --all`` lists them):

==================  ==========================  ==========================================  =======================
signature           method                      inputs                                      outputs
==================  ==========================  ==========================================  =======================
``serving_default`` ``tensorflow/serving/       ``examples``: string [batch], serialized     one float [batch] per
                    predict``                   *raw* ``tf.Example``s: one feature per       key of the model's
                                                schema field, named as the field             ``serving_outputs``
                                                (``featurization.raw``; docs/SERVING.md)
``rank``            ``tensorflow/serving/       ``context``: string [], one raw Example of   one float [N] per
                    predict``                   the shared fields; ``examples``: string      output
                                                [N], the candidates' raw Examples (a
                                                candidate's field overrides the context's)
``predict_hashed``  ``tensorflow/serving/       ``examples``: string [batch], the ETL's      same as
                    predict``                   hashed records (``feat_hashes``,             ``serving_default``
                                                ``feat_vals``, ``feat_field_hashes``)
``predict_ids``     ``tensorflow/serving/       ``ids`` int64, ``values`` float32,           same as above
                    predict``                   ``fields`` int64, all [batch, width]
``classification``  ``tensorflow/serving/       ``inputs``: string [batch], raw Examples     ``scores`` float
                    classify``                                                               [batch, 2],
                                                                                             ``classes`` string
                                                                                             [batch, 2]
``regression``      ``tensorflow/serving/       ``inputs``: string [batch], raw Examples     ``outputs`` float
                    regress``                                                                [batch]
==================  ==========================  ==========================================  =======================

Raw Examples are featurized in the graph (``featurization``): keys are hashed, looked up in the
vocabulary, binned, scaled and joined with the ETL's entity tables there, so a client in any language
sends what the log holds. A feature key that is not a field of the schema fails the request with
INVALID_ARGUMENT naming the key.

``predict_ids`` padding convention: row ``i`` of the three dense tensors lists the
features of example ``i``; a slot whose field id is negative (``PAD_FIELD``, -1) is
padding and is ignored, whatever its id and value. Rows may hold any number of
real features up to ``width``, in any slots. Ids are the stable feature hashes
(``feature_schema.feature_hash``; binned and numeric fields: the field's value key with
the raw number as value); the graph maps them to vocabulary rows, unknown hashes to the
field's rare row, and adds the missing fields.

``classification`` and ``regression`` expose the model's first serving output
(the primary task, e.g. ``click`` or ``ctr``): classes ``"0"``/``"1"`` with
scores ``1 - p`` and ``p``, and the regression value ``p``. Multi-task outputs
(``ctr``, ``cvr``, ``ctcvr``) all come from the Predict signatures.

The second half of the module converts between numpy arrays and ``TensorProto``s
without going through ``tf.make_tensor_proto`` / ``tf.make_ndarray``, which cost
more than a whole small model's inference.
"""
from __future__ import annotations

import math

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

SERVE_TAG = "serve"
PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

DEFAULT_SIGNATURE = "serving_default"
RANK_SIGNATURE = "rank"
HASHED_SIGNATURE = "predict_hashed"
IDS_SIGNATURE = "predict_ids"
CLASSIFY_SIGNATURE = "classification"
REGRESS_SIGNATURE = "regression"

EXAMPLES_INPUT = "examples"
CONTEXT_INPUT = "context"
# The parallel float feature of a categorical field's values in a raw Example (featurization.raw).
VALUE_SUFFIX = ":value"
IDS_INPUT, VALUES_INPUT, FIELDS_INPUT = "ids", "values", "fields"
# TF Serving's fixed tensor keys of Classify/Regress signatures (signature_constants.py).
CLASSIFY_INPUTS = "inputs"
CLASSIFY_SCORES = "scores"
CLASSIFY_CLASSES = "classes"
REGRESS_INPUTS = "inputs"
REGRESS_OUTPUTS = "outputs"
CLASS_LABELS = (b"0", b"1")

PAD_FIELD = -1

ASSETS_EXTRA = "assets.extra"
# The file TF Serving replays before a version takes traffic (fixed name, TFRecord of PredictionLog).
WARMUP_FILE = "tf_serving_warmup_requests"
CONFIG_FILE = "config.yaml"

_DT = types_pb2
_NP_OF_DT = {
    _DT.DT_FLOAT: np.float32, _DT.DT_DOUBLE: np.float64, _DT.DT_INT32: np.int32, _DT.DT_INT64: np.int64,
    _DT.DT_UINT8: np.uint8, _DT.DT_INT16: np.int16, _DT.DT_INT8: np.int8, _DT.DT_UINT16: np.uint16,
    _DT.DT_UINT32: np.uint32, _DT.DT_UINT64: np.uint64, _DT.DT_BOOL: np.bool_, _DT.DT_HALF: np.float16,
}
_DT_OF_NP = {np.dtype(v): k for k, v in _NP_OF_DT.items()}
# tensor_content is little-endian whatever the host's byte order.
_LE_OF_DT = {k: np.dtype(v).newbyteorder("<") for k, v in _NP_OF_DT.items()}
# Typed repeated field holding the values of each dtype when tensor_content is empty.
_VAL_FIELD = {
    _DT.DT_FLOAT: "float_val", _DT.DT_DOUBLE: "double_val", _DT.DT_INT32: "int_val", _DT.DT_UINT8: "int_val",
    _DT.DT_INT16: "int_val", _DT.DT_INT8: "int_val", _DT.DT_UINT16: "int_val", _DT.DT_INT64: "int64_val",
    _DT.DT_UINT32: "uint32_val", _DT.DT_UINT64: "uint64_val", _DT.DT_BOOL: "bool_val", _DT.DT_HALF: "half_val",
}


class TensorError(ValueError):
    """A TensorProto that does not describe a valid tensor (the server answers INVALID_ARGUMENT)."""


def dtype_name(dtype: int) -> str:
    return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)


def shape_of(proto: tensor_pb2.TensorProto) -> tuple[int, ...]:
    return tuple([d.size for d in proto.tensor_shape.dim])


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The numpy array of a TensorProto (strings as an object array of bytes).

    Follows ``tensorflow::Tensor::FromProto``: ``tensor_content`` holds the raw
    little-endian bytes; otherwise the typed ``*_val`` field holds the values,
    and fewer values than elements repeat the last one (none means zeros).

    Numbers in ``tensor_content`` come back as a read-only view of the proto's
    bytes (``np.frombuffer``, no copy). This runs on every request and response:
    ``math.prod`` instead of ``np.prod`` and one list of the strings instead of
    per-item conversion keep a 100-ad request's decode at about 10 us.

    Raises:
      TensorError: unknown dtype, negative dims, or a value count that does not fit the shape.
    """
    shape = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor shape {shape} has a negative dimension")
    size = math.prod(shape)
    dt = proto.dtype
    if dt == _DT.DT_STRING:
        vals = list(proto.string_val)
        if len(vals) == size:
            arr = np.empty(size, dtype=object)
            arr[:] = vals
            return arr if len(shape) == 1 else arr.reshape(shape)
        return _fill(vals, size, shape, object, b"")
    np_type = _NP_OF_DT.get(dt)
    if np_type is None:
        raise TensorError(f"unsupported tensor dtype {dtype_name(dt)}")
    content = proto.tensor_content
    if content:
        le = _LE_OF_DT[dt]
        if len(content) != size * le.itemsize:
            raise TensorError(f"tensor_content has {len(content)} bytes, shape {shape} of "
                              f"{dtype_name(dt)} needs {size * le.itemsize}")
        return np.frombuffer(content, dtype=le).reshape(shape)
    vals = getattr(proto, _VAL_FIELD[dt])
    if dt == _DT.DT_HALF:  # half_val holds the float16 bit patterns as int32
        arr = np.asarray(vals, dtype=np.uint16).view(np.float16)
        return _fill(list(arr), size, shape, np_type, 0)
    if len(vals) == size:
        return np.asarray(vals, dtype=np_type).reshape(shape)
    return _fill(list(vals), size, shape, np_type, 0)


def _fill(vals: list, size: int, shape, np_type, zero) -> np.ndarray:
    if len(vals) > size:
        raise TensorError(f"tensor has {len(vals)} values, more than its shape {list(shape)} holds ({size})")
    arr = np.empty(size, dtype=np_type) if np_type is object else np.zeros(size, dtype=np_type)
    arr[:] = vals[-1] if vals else zero
    arr[:len(vals)] = vals
    return arr.reshape(shape)


def from_ndarray(arr, proto: tensor_pb2.TensorProto | None = None) -> tensor_pb2.TensorProto:
    """Fills ``proto`` (or a new TensorProto) with ``arr``: numbers as tensor_content, strings as string_val."""
    proto = tensor_pb2.TensorProto() if proto is None else proto
    arr = np.asarray(arr)
    dims = proto.tensor_shape.dim
    for d in arr.shape:
        dims.add().size = d
    if arr.dtype.kind in ("O", "S", "U"):
        proto.dtype = _DT.DT_STRING
        flat = arr.ravel().tolist()
        proto.string_val.extend(s.encode("utf-8") if isinstance(s, str) else s for s in flat)
        return proto
    dt = _DT_OF_NP.get(arr.dtype)
    if dt is None:
        raise TensorError(f"unsupported numpy dtype {arr.dtype}")
    proto.dtype = dt
    proto.tensor_content = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return proto


def strings_proto(values, proto: tensor_pb2.TensorProto | None = None, scalar: bool = False) -> tensor_pb2.TensorProto:
    """A 1-D string TensorProto of ``values`` (bytes), e.g. a batch of serialized tf.Examples;
    ``scalar``: a 0-D one of the single value (the ``rank`` signature's ``context``)."""
    proto = tensor_pb2.TensorProto() if proto is None else proto
    proto.dtype = _DT.DT_STRING
    if scalar:
        if len(values) != 1:
            raise TensorError(f"a scalar string tensor holds one value, got {len(values)}")
    else:
        proto.tensor_shape.dim.add().size = len(values)
    proto.string_val.extend(values)
    return proto


def pad_ids(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ``predict_ids`` inputs of variable-length rows.

    Args:
      rows: per example, a sequence of ``(hash, value, field id)``.

    Returns:
      ``(ids int64, values float32, fields int64)`` of shape [len(rows), max row
      length], padded with id 0, value 0 and field ``PAD_FIELD``.
    """
    width = max((len(r) for r in rows), default=0)
    ids = np.zeros((len(rows), width), np.int64)
    vals = np.zeros((len(rows), width), np.float32)
    fields = np.full((len(rows), width), PAD_FIELD, np.int64)
    for i, r in enumerate(rows):
        if r:
            h, v, f = zip(*r)
            ids[i, :len(r)] = h
            vals[i, :len(r)] = v
            fields[i, :len(r)] = f
    return ids, vals, fields


def example_rows(serialized, schema) -> list[list[tuple[int, float, int]]]:
    """``(hash, value, field id)`` rows of serialized hashed records (the ``predict_ids`` view of them).

    Args:
      serialized: serialized ``tf.train.Example``s in the ETL's hashed-record format.
      schema: the served model's schema (its example keys; field hashes -> field ids).
    """
    from tensorflow.core.example import example_pb2

    from feature_schema import field_hash

    keys = schema.example_keys
    field_id = {field_hash(f.name): f.id for f in schema.fields}
    out = []
    for s in serialized:
        feat = example_pb2.Example.FromString(s).features.feature
        out.append([(h, v, field_id[f]) for h, v, f in zip(feat[keys.hashes].int64_list.value,
                                                          feat[keys.values].float_list.value,
                                                          feat[keys.field_hashes].int64_list.value)])
    return out


def raw_example(features, value_fields=frozenset()) -> bytes:
    """A serialized raw tf.Example of ``(field, key, value)`` features (``featurization.raw``'s contract).

    Categorical fields: a ``bytes_list`` of the keys, plus ``<field>:value`` when a value is not 1;
    ``value_fields`` (binned, numeric): a ``float_list`` of the numbers. Fields keep first-seen order.
    """
    from tensorflow.core.example import example_pb2

    ex = example_pb2.Example()
    feature = ex.features.feature
    grouped: dict[str, list] = {}
    for field, key, value in features:
        grouped.setdefault(field, []).append((key, value))
    for field, items in grouped.items():
        if field in value_fields:
            feature[field].float_list.value.extend(v for _, v in items)
            continue
        feature[field].bytes_list.value.extend(k.encode("utf-8") for k, _ in items)
        if any(v != 1.0 for _, v in items):
            feature[field + VALUE_SUFFIX].float_list.value.extend(v for _, v in items)
    return ex.SerializeToString()
