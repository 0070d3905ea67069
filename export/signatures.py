"""The serving graph: every signature featurizes its input with the one featurization layer, then runs the model.

``serving.protocol`` documents the signatures. Raw Examples (``serving_default``, ``rank``,
``classification``, ``regression``) go through ``Featurizer.from_examples`` / ``from_context``;
the ETL's hashed records (``predict_hashed``) through ``from_records``; dense hashed ids
(``predict_ids``) through ``from_field_ids``. No signature maps a key to a row itself.
"""
from __future__ import annotations

import os

import tensorflow as tf

from feature_schema import Schema
from featurization import Featurizer
from serving import protocol
from serving.protocol import (CLASSIFY_CLASSES, CLASSIFY_INPUTS, CLASSIFY_METHOD, CLASSIFY_SCORES, CLASSIFY_SIGNATURE,
                              CONTEXT_INPUT, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT, HASHED_SIGNATURE,
                              IDS_INPUT, IDS_SIGNATURE, RANK_SIGNATURE, REGRESS_INPUTS, REGRESS_METHOD,
                              REGRESS_OUTPUTS, REGRESS_SIGNATURE, VALUES_INPUT)

SIGNATURES = (DEFAULT_SIGNATURE, RANK_SIGNATURE, HASHED_SIGNATURE, IDS_SIGNATURE, CLASSIFY_SIGNATURE,
              REGRESS_SIGNATURE)
METHODS = {CLASSIFY_SIGNATURE: CLASSIFY_METHOD, REGRESS_SIGNATURE: REGRESS_METHOD}


class ServingModule(tf.Module):
    """The exported module: the model behind one featurizer, with one ``tf.function`` per signature.

    ``self.model`` must stay the first tracked attribute: ``trainer.warm_start`` reads an export's
    variables as ``model/variables/<i>``.
    """

    def __init__(self, model, schema: Schema):
        super().__init__()
        self.model = model
        self._keys = schema.example_keys
        self.featurizer = Featurizer(schema, raw_examples=True)
        self.outputs = tuple(model.serving_outputs)
        # The model traced once; every signature calls this one function after its own front end
        # (tracing the model per signature made saving several times slower).
        # The featurized batch: the sparse features, and the vectors of vector fields when the schema has them.
        self._model_fn = tf.function(self._forward, input_signature=[self.featurizer.output_signature()],
                                     autograph=False)

    def _forward(self, features: dict) -> dict:
        out = self.model(features, training=False)
        return {t: out[t] for t in self.outputs}

    def run(self, features: dict) -> dict:
        return self._model_fn(features)

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(self, examples):
        return self.run(self.featurizer.from_examples(examples))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.string, name=CONTEXT_INPUT),
                                  tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def rank(self, context, examples):
        return self.run(self.featurizer.from_context(context, examples))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_hashed(self, examples):
        k = self._keys
        parsed = tf.io.parse_example(examples, {k.hashes: tf.io.VarLenFeature(tf.int64),
                                                k.values: tf.io.VarLenFeature(tf.float32),
                                                k.field_hashes: tf.io.VarLenFeature(tf.int64)})
        return self.run(self.featurizer.from_records(parsed[k.hashes], parsed[k.values], parsed[k.field_hashes]))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, None], tf.int64, name=IDS_INPUT),
                                  tf.TensorSpec([None, None], tf.float32, name=VALUES_INPUT),
                                  tf.TensorSpec([None, None], tf.int64, name=FIELDS_INPUT)])
    def serve_ids(self, ids, values, fields):
        # Real slots (field >= 0) are packed to the left of each row, in their order.
        real = fields >= 0
        where = tf.where(real)
        col = tf.gather_nd(tf.cumsum(tf.cast(real, tf.int64), axis=1) - 1, where)
        idx = tf.stack([where[:, 0], col], axis=1)
        width = tf.reduce_max(tf.concat([tf.reduce_sum(tf.cast(real, tf.int64), axis=1), [0]], axis=0))
        shape = tf.stack([tf.shape(ids, out_type=tf.int64)[0], width])
        sparse = [tf.SparseTensor(idx, tf.gather_nd(t, where), shape) for t in (ids, values, fields)]
        return self.run(self.featurizer.from_field_ids(*sparse))

    def _primary(self, examples):
        return self.serve_examples(examples)[self.outputs[0]]

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUTS)])
    def classify(self, inputs):
        p = self._primary(inputs)
        classes = tf.tile(tf.constant([list(protocol.CLASS_LABELS)]), [tf.shape(p)[0], 1])
        return {CLASSIFY_SCORES: tf.stack([1.0 - p, p], axis=1), CLASSIFY_CLASSES: classes}

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=REGRESS_INPUTS)])
    def regress(self, inputs):
        return {REGRESS_OUTPUTS: self._primary(inputs)}

    def signatures(self) -> dict:
        return {DEFAULT_SIGNATURE: self.serve_examples, RANK_SIGNATURE: self.rank,
                HASHED_SIGNATURE: self.serve_hashed, IDS_SIGNATURE: self.serve_ids,
                CLASSIFY_SIGNATURE: self.classify, REGRESS_SIGNATURE: self.regress}


def save(module: ServingModule, export_dir: str) -> None:
    """Writes the SavedModel with every signature, Classify/Regress marked with their methods."""
    tf.saved_model.save(module, export_dir, signatures=module.signatures())
    set_method_names(export_dir, METHODS)


def set_method_names(export_dir: str, methods: dict[str, str]) -> None:
    """Sets signatures' method names in saved_model.pb and rewrites the fingerprint.

    ``tf.saved_model.save`` marks every signature ``tensorflow/serving/predict``;
    TF Serving's Classify and Regress APIs only run signatures marked
    ``tensorflow/serving/classify`` / ``tensorflow/serving/regress``.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model import fingerprinting_utils

    path = os.path.join(export_dir, "saved_model.pb")
    sm = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        sm.ParseFromString(f.read())
    for meta in sm.meta_graphs:
        for name, method in methods.items():
            meta.signature_def[name].method_name = method
    with open(path, "wb") as f:
        f.write(sm.SerializeToString())
    # fingerprint.pb holds a checksum of saved_model.pb; recompute it the way tf.saved_model.save does.
    fingerprinting_utils.write_fingerprint(export_dir)
