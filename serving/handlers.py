"""Request handling: Predict, Classify, Regress, metadata, status and config reload on the manager's
models (the protocol logic, independent of gRPC)."""
from __future__ import annotations

import grpc
import numpy as np
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, predict_pb2, regression_pb2)

from typing import TYPE_CHECKING

from serving import protocol
from serving.errors import TF_OK, ServingError, invalid, not_found
from serving.protocol import CLASSIFY_METHOD, REGRESS_METHOD

if TYPE_CHECKING:  # the manager builds the handlers; only the annotations name its classes
    from serving.manager import LoadedVersion, ModelManager


def _serialized_examples(inp) -> np.ndarray:
    """Serialized tf.Examples of a Classify/Regress ``Input`` (context merged into each example)."""
    kind = inp.WhichOneof("kind")
    if kind == "example_list":
        examples = [e.SerializeToString() for e in inp.example_list.examples]
    elif kind == "example_list_with_context":
        # Concatenated serializations parse as a merge: the example's features override the context's.
        ctx = inp.example_list_with_context.context.SerializeToString()
        examples = [ctx + e.SerializeToString() for e in inp.example_list_with_context.examples]
    else:
        raise invalid("input is empty: set example_list or example_list_with_context")
    if not examples:
        raise invalid("input has no examples")
    arr = np.empty(len(examples), dtype=object)
    arr[:] = examples
    return arr


def _fill_spec(out_spec, lv: LoadedVersion, signature: str) -> None:
    out_spec.name = lv.model_name
    out_spec.version.value = lv.version
    out_spec.signature_name = signature


class Handlers:
    """Predict, Classify, Regress, GetModelMetadata, GetModelStatus and ReloadConfig on the manager's models."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def _with_version(self, spec, fn, req):
        lv = self.manager.acquire(spec)
        try:
            return fn(lv, req)
        finally:
            lv.release()

    def predict(self, req) -> predict_pb2.PredictResponse:
        return self._with_version(req.model_spec, self.predict_on, req)

    def classify(self, req) -> classification_pb2.ClassificationResponse:
        return self._with_version(req.model_spec, self.classify_on, req)

    def regress(self, req) -> regression_pb2.RegressionResponse:
        return self._with_version(req.model_spec, self.regress_on, req)

    def predict_on(self, lv: LoadedVersion, req) -> predict_pb2.PredictResponse:
        sig = lv.signature(req.model_spec.signature_name)
        inputs = req.inputs
        if len(inputs) != len(sig.input_keys) or any(k not in inputs for k in sig.input_keys):
            raise invalid(f"signature {sig.name!r} takes inputs {list(sig.input_keys)}, got {sorted(inputs)}")
        feeds = [sig.check_input(k, inputs[k]) for k in sig.input_keys]
        if req.output_filter:
            unknown = [k for k in req.output_filter if k not in sig.output_keys]
            if unknown:
                raise invalid(f"output_filter {unknown} not in the outputs {list(sig.output_keys)} of {sig.name!r}")
            out_keys = tuple(sorted(set(req.output_filter)))
        else:
            out_keys = sig.output_keys
        results = sig.run(feeds, out_keys)
        resp = predict_pb2.PredictResponse()
        _fill_spec(resp.model_spec, lv, sig.name)
        outputs = resp.outputs
        for k, arr in zip(out_keys, results):
            protocol.from_ndarray(arr, outputs[k])
        return resp

    def _run_examples(self, lv, req, method, api):
        sig = lv.signature(req.model_spec.signature_name)
        if sig.method != method:
            raise invalid(f"{api} needs a signature of method {method}; {sig.name!r} is {sig.method!r}")
        if sig.input_keys != (protocol.CLASSIFY_INPUTS,):
            raise invalid(f"signature {sig.name!r} must have the one input {protocol.CLASSIFY_INPUTS!r}")
        return sig, _serialized_examples(req.input)

    def classify_on(self, lv: LoadedVersion, req) -> classification_pb2.ClassificationResponse:
        sig, examples = self._run_examples(lv, req, CLASSIFY_METHOD, "Classify")
        keys = tuple(k for k in (protocol.CLASSIFY_CLASSES, protocol.CLASSIFY_SCORES) if k in sig.output_keys)
        if not keys:
            raise invalid(f"signature {sig.name!r} has neither classes nor scores")
        out = dict(zip(keys, sig.run([examples], keys)))
        classes, scores = out.get(protocol.CLASSIFY_CLASSES), out.get(protocol.CLASSIFY_SCORES)
        n = len(examples)
        for arr in (classes, scores):
            if arr is not None and (arr.ndim != 2 or arr.shape[0] != n):
                raise ServingError(grpc.StatusCode.INTERNAL, f"classify output of shape {arr.shape} for {n} inputs")
        resp = classification_pb2.ClassificationResponse()
        _fill_spec(resp.model_spec, lv, sig.name)
        labels = None if classes is None else [[c.decode("utf-8", "replace") for c in row] for row in classes]
        values = None if scores is None else scores.tolist()
        k = len((labels or values)[0])
        for i in range(n):
            c = resp.result.classifications.add()
            for j in range(k):
                cls = c.classes.add()
                if labels is not None:
                    cls.label = labels[i][j]
                if values is not None:
                    cls.score = values[i][j]
        return resp

    def regress_on(self, lv: LoadedVersion, req) -> regression_pb2.RegressionResponse:
        sig, examples = self._run_examples(lv, req, REGRESS_METHOD, "Regress")
        if protocol.REGRESS_OUTPUTS not in sig.output_keys:
            raise invalid(f"signature {sig.name!r} has no {protocol.REGRESS_OUTPUTS!r} output")
        (values,) = sig.run([examples], (protocol.REGRESS_OUTPUTS,))
        values = np.asarray(values).reshape(len(examples), -1)
        if values.shape[1] != 1:
            raise ServingError(grpc.StatusCode.INTERNAL, f"regress output of shape {values.shape}")
        resp = regression_pb2.RegressionResponse()
        _fill_spec(resp.model_spec, lv, sig.name)
        for v in values[:, 0].tolist():
            resp.result.regressions.add().value = v
        return resp

    def metadata(self, req) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not req.metadata_field:
            raise invalid("metadata_field is empty: ask for 'signature_def'")
        unknown = [f for f in req.metadata_field if f != "signature_def"]
        if unknown:
            raise invalid(f"metadata fields {unknown} are not supported (only 'signature_def')")
        lv = self.manager.acquire(req.model_spec)
        try:
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(resp.model_spec, lv, "")
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for name, sd in lv.signature_defs.items():
                sig_map.signature_def[name].CopyFrom(sd)
            resp.metadata["signature_def"].Pack(sig_map)
            return resp
        finally:
            lv.release()

    def status(self, req) -> get_model_status_pb2.GetModelStatusResponse:
        spec = req.model_spec
        if not spec.name:
            raise invalid("model_spec.name is empty")
        model = self.manager.models.get(spec.name)
        if model is None:
            raise not_found(f"model {spec.name!r} not found (models: {sorted(self.manager.models)})")
        statuses = model.statuses
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            target = model.labels.get(spec.version_label)
            if target is None:
                raise invalid(f"model {spec.name!r}: unknown version label {spec.version_label!r}")
            wanted = [target]
        elif choice == "version":
            wanted = [spec.version.value]
        else:
            wanted = sorted(statuses)
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in wanted:
            if v not in statuses:
                raise not_found(f"model {spec.name!r} version {v} is unknown (versions: {sorted(statuses)})")
            state, code, message = statuses[v]
            s = resp.model_version_status.add()
            s.version, s.state = v, state
            s.status.error_code, s.status.error_message = code, message
        return resp

    def reload_config(self, req) -> model_management_pb2.ReloadConfigResponse:
        try:
            self.manager.check_request_config(req.config)
            self.manager.apply_config(req.config)
        except ValueError as e:
            raise invalid(f"config rejected: {e}") from None
        resp = model_management_pb2.ReloadConfigResponse()
        resp.status.error_code = TF_OK
        return resp
