"""The ETL's output encoding: `tf.train.Example` protos and TFRecord framing, without TensorFlow.

Importing the Example protos from TensorFlow (``tensorflow.core.example``)
loads all of TensorFlow, seconds and hundreds of MiB in every Beam worker
process. This module declares the same six messages (package ``tensorflow``,
same field numbers and proto3 packing as
``tensorflow/core/example/{example,feature}.proto``) in a private descriptor
pool, so the wire bytes are identical and nothing clashes with TensorFlow's own
classes when both are loaded in one process.

``frame`` wraps one serialized record in the TFRecord format (what
``tf.io.TFRecordWriter`` writes): little-endian uint64 length, masked CRC-32C
of the length, the data, masked CRC-32C of the data. The job concatenates
framed records into one blob per batch and gzips whole shards.
``tests/test_etl_pipeline.py`` reads the files back with ``tf.data`` and
``tf.train.Example``.
"""
from __future__ import annotations

import struct

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto(name="ctr_etl/tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name, fields, nested=(), oneof=None):
        m = fdp.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name=oneof)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        return m

    rep, opt = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
    message("BytesList", [("value", 1, _F.TYPE_BYTES, rep, "")])
    message("FloatList", [("value", 1, _F.TYPE_FLOAT, rep, "")])
    message("Int64List", [("value", 1, _F.TYPE_INT64, rep, "")])
    message("Feature", [("bytes_list", 1, _F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                        ("float_list", 2, _F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                        ("int64_list", 3, _F.TYPE_MESSAGE, opt, ".tensorflow.Int64List")], oneof="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Features", [("feature", 1, _F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry")], nested=[entry])
    message("Example", [("features", 1, _F.TYPE_MESSAGE, opt, ".tensorflow.Features")])
    return fdp


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())

Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_crc32c = google_crc32c.value


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C: rotate right by 15 bits and add a constant."""
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord: length, CRC of the length, data, CRC of the data."""
    length = _U64.pack(len(data))
    return b"".join((length, _U32.pack(masked_crc32c(length)), data, _U32.pack(masked_crc32c(data))))


class ExampleEncoder:
    """Serializes version-2 records (``feature_schema.ExampleKeys``) by refilling one reused `Example`.

    Refilling the lists of one message is about twice as fast as building a new message (and
    its map entries) per example; it was also as fast as writing the wire format by hand.
    Not thread-safe: each DoFn instance makes its own in ``setup``.
    """

    def __init__(self, label_names, keys):
        self._msg = Example()
        feature = self._msg.features.feature
        self._lists = (feature[keys.hashes].int64_list.value, feature[keys.values].float_list.value,
                       feature[keys.field_hashes].int64_list.value)
        self._labels = tuple(feature[name].float_list.value for name in label_names)

    def encode(self, hashes, values, field_hashes, labels) -> bytes:
        """One record: aligned feature hashes, values (stored as float32), field hashes; labels."""
        for lst, data in zip(self._lists, (hashes, values, field_hashes)):
            del lst[:]
            lst.extend(data)
        for lst, v in zip(self._labels, labels):
            del lst[:]
            lst.append(v)
        return self._msg.SerializeToString()
