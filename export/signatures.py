"""The serving graph: every signature featurizes its input with the one featurization layer, then runs the model.

``serving.protocol`` documents the signatures. Raw Examples (``serving_default``, ``rank``,
``classification``, ``regression``) go through ``Featurizer.from_examples`` / ``from_context``;
the ETL's hashed records (``predict_hashed``) through ``from_records``; dense hashed ids
(``predict_ids``) through ``from_field_ids``. No signature maps a key to a row itself.

With a fusion config (``trainer.config.FusionConfig``) the raw Predict signatures (``serving_default``,
``rank``) add ``fusion = ctr^a * cvr^b * bid``, the bid read from a float feature of each raw
Example (``rank``: a candidate's own, else the context's); a request without it fails with
INVALID_ARGUMENT naming the feature. The other signatures accept the feature and ignore it.
"""
from __future__ import annotations

import os

import tensorflow as tf

from feature_schema import Schema
from featurization import Featurizer, raw
from serving import protocol
from serving.protocol import (CLASSIFY_CLASSES, CLASSIFY_INPUTS, CLASSIFY_METHOD, CLASSIFY_SCORES, CLASSIFY_SIGNATURE,
                              CONTEXT_INPUT, DEFAULT_SIGNATURE, EXAMPLES_INPUT, FIELDS_INPUT, HASHED_SIGNATURE,
                              IDS_INPUT, IDS_SIGNATURE, RANK_SIGNATURE, REGRESS_INPUTS, REGRESS_METHOD,
                              REGRESS_OUTPUTS, REGRESS_SIGNATURE, VALUES_INPUT)

FUSION_OUTPUT = "fusion"
SIGNATURES = (DEFAULT_SIGNATURE, RANK_SIGNATURE, HASHED_SIGNATURE, IDS_SIGNATURE, CLASSIFY_SIGNATURE,
              REGRESS_SIGNATURE)
METHODS = {CLASSIFY_SIGNATURE: CLASSIFY_METHOD, REGRESS_SIGNATURE: REGRESS_METHOD}


def check_fusion(fusion, outputs, schema: Schema) -> None:
    """Refuses a fusion config naming outputs the model lacks, or a bid feature the Examples use otherwise.

    Raises:
      ValueError: naming the config key and what the model or schema has.
    """
    if fusion is None:
        return
    for key in ("ctr_output", "cvr_output"):
        if getattr(fusion, key) not in outputs:
            raise ValueError(f"fusion.{key} {getattr(fusion, key)!r} is not an output of the model "
                             f"(outputs: {list(outputs)})")
    taken = {f.name for f in schema.fields} | {f.name + protocol.VALUE_SUFFIX for f in schema.fields}
    if fusion.bid_feature in taken:
        raise ValueError(f"fusion.bid_feature {fusion.bid_feature!r} is a feature of the schema's fields; "
                         f"name a feature of its own")
    if FUSION_OUTPUT in outputs:
        raise ValueError(f"the model already has an output {FUSION_OUTPUT!r}")


def fusion_score(ctr, cvr, bid, a: float, b: float):
    """``ctr^a * cvr^b * bid`` (multi-objective ranking score, ESM^2-style; float32 ``[n]``)."""
    return tf.pow(ctr, a) * tf.pow(cvr, b) * bid


def read_bids(examples, name: str):
    """(bid ``[n]``, has one ``[n]`` bool) of serialized raw Examples ``[n]``.

    Fails with InvalidArgument naming ``name`` when an Example holds more than one value, or a value
    that is negative or not finite (a bid of another dtype fails the parse, naming the key too).
    """
    sp = raw.parse_examples(examples, {name: tf.io.VarLenFeature(tf.float32)})[name]
    n = tf.shape(examples, out_type=tf.int64)[0]
    row = sp.indices[:, 0]
    count = tf.math.unsorted_segment_sum(tf.ones_like(row), row, n)
    ok = tf.debugging.Assert(
        tf.reduce_all(count <= 1) & tf.reduce_all(tf.math.is_finite(sp.values) & (sp.values >= 0)),
        [f"the fusion output's bid feature named {name} must hold one finite value >= 0 per Example; counts:",
         count, "values", sp.values], summarize=20)
    with tf.control_dependencies([ok]):
        return tf.math.unsorted_segment_sum(sp.values, row, n), count > 0


def _require_bids(has, name: str, where: str):
    return tf.debugging.Assert(tf.reduce_all(has), [
        f"{where} lack the float feature named {name} that the fusion output needs (fusion.bid_feature); "
        f"Examples without it:", tf.where(~has)[:, 0]], summarize=20)


class ServingModule(tf.Module):
    """The exported module: the model behind one featurizer, with one ``tf.function`` per signature.

    ``self.model`` must stay the first tracked attribute: ``trainer.warm_start`` reads an export's
    variables as ``model/variables/<i>``.

    Args:
      model: the trained model.
      schema: its schema.
      fusion: a ``FusionConfig`` (the raw Predict signatures add ``fusion``), or None.
    """

    def __init__(self, model, schema: Schema, fusion=None):
        super().__init__()
        self.model = model
        self._keys = schema.example_keys
        self.outputs = tuple(model.serving_outputs)
        check_fusion(fusion, self.outputs, schema)
        self._fusion = fusion
        self.featurizer = Featurizer(schema, raw_examples=True,
                                     extra_features=(fusion.bid_feature,) if fusion else ())
        # The model traced once; every signature calls this one function after its own front end
        # (tracing the model per signature made saving several times slower).
        # The featurized batch: the sparse features, and the vectors of vector fields when the schema has them.
        self._model_fn = tf.function(self._forward, input_signature=[self.featurizer.output_signature()],
                                     autograph=False)
        # Raw Examples -> the model's outputs, traced once for serving_default, Classify and Regress
        # (only serving_default adds the fusion output, so Classify and Regress need no bid).
        self._raw_fn = tf.function(self._raw_outputs, input_signature=[tf.TensorSpec([None], tf.string)],
                                   autograph=False)

    def _forward(self, features: dict) -> dict:
        out = self.model(features, training=False)
        return {t: out[t] for t in self.outputs}

    def run(self, features: dict) -> dict:
        return self._model_fn(features)

    def _raw_outputs(self, examples) -> dict:
        return self.run(self.featurizer.from_examples(examples))

    def _fuse(self, out: dict, bid) -> dict:
        f = self._fusion
        return {**out, FUSION_OUTPUT: fusion_score(out[f.ctr_output], out[f.cvr_output], bid, f.a, f.b)}

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_examples(self, examples):
        out = self._raw_fn(examples)
        if self._fusion is None:
            return out
        name = self._fusion.bid_feature
        bid, has = read_bids(examples, name)
        with tf.control_dependencies([_require_bids(has, name, "serving_default: request Examples")]):
            return self._fuse(out, tf.identity(bid))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.string, name=CONTEXT_INPUT),
                                  tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def rank(self, context, examples):
        out = self.run(self.featurizer.from_context(context, examples))
        if self._fusion is None:
            return out
        name = self._fusion.bid_feature
        bid, has = read_bids(examples, name)
        ctx_bid, ctx_has = read_bids(tf.reshape(context, [1]), name)
        has_any = has | ctx_has[0]
        with tf.control_dependencies([_require_bids(has_any, name, "rank: candidates (and the context)")]):
            return self._fuse(out, tf.where(has, bid, ctx_bid[0]))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    def serve_hashed(self, examples):
        k = self._keys
        parsed = raw.parse_examples(examples, {k.hashes: tf.io.VarLenFeature(tf.int64),
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
        return self._raw_fn(examples)[self.outputs[0]]

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
