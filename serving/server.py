"""A local gRPC server that speaks TF Serving's protocol over the project's SavedModels.

    python -m serving.server --model_config_file serving_configs/models.config --base_path runs/export
    python -m serving.server --model_name fm --model_base_path runs/export/fm --port 8500

It implements ``tensorflow.serving.PredictionService`` (Predict, Classify,
Regress, GetModelMetadata) and ``tensorflow.serving.ModelService``
(GetModelStatus, HandleReloadConfigRequest) with the generated classes of
``tensorflow-serving-api``, so TF Serving's own clients and this project's
``serving.client`` talk to it unchanged. It imports TensorFlow, the protos and
nothing of the training code.

Model lifecycle (as in TF Serving):

* ``models.config`` is a text ``ModelServerConfig`` (``model_config_list``
  only); ``--base_path`` replaces the directory part of every model's
  ``base_path`` (``/models/fm`` -> ``<base_path>/fm``), so the container config
  serves local exports.
* A poller lists each model's integer version directories every
  ``--file_system_poll_wait_seconds`` and applies the version policy (``latest``,
  default 1; ``all``; ``specific``). A new version is loaded with
  ``tf.compat.v1.saved_model.loader.load`` into its own Session, its
  ``assets.extra/tf_serving_warmup_requests`` are replayed through the same
  request path, and only then does it take traffic. Versions leaving the policy
  are unloaded after that (availability preserving: the last serving version
  stays until a newer one is available); an unloading version finishes the
  requests already running on it before its Session closes, so a swap fails no
  request.
* Paths are confined (``feature_schema.paths``): with ``--base_path`` every
  model directory is ``<base_path>/<plain name>`` and must resolve inside it
  (no ``..``, no symlink out). A config sent by a client through
  ``HandleReloadConfigRequest`` may only name base paths inside the server's
  roots: ``--base_path``, else the parent directories of the startup config's
  base paths; anything else is INVALID_ARGUMENT and changes nothing.
* ``version_labels`` (``stable``, ``canary``) resolve ``ModelSpec.version_label``.
  With ``--model_config_file_poll_wait_seconds`` > 0 the config file is re-read
  when it changes (promote a canary by editing its label); the
  ``HandleReloadConfigRequest`` RPC applies a config sent by a client.

Status codes: unknown model, version, label target or signature -> NOT_FOUND;
unknown label, missing model name, wrong or missing inputs, wrong dtype or shape,
unknown ``output_filter`` key, a signature of the wrong method for
Classify/Regress, empty Classify/Regress input, malformed tf.Examples ->
INVALID_ARGUMENT; a message over ``--max_message_bytes`` -> RESOURCE_EXHAUSTED
(from gRPC). The server stays up after every one of them.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                     model_management_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_log_pb2, prediction_service_pb2_grpc, regression_pb2)
from tensorflow_serving.config import model_server_config_pb2

from feature_schema import paths
from serving import protocol
from serving.protocol import CLASSIFY_METHOD, DEFAULT_SIGNATURE, REGRESS_METHOD, SERVE_TAG

log = logging.getLogger("serving.server")

State = get_model_status_pb2.ModelVersionStatus.State
DEFAULT_PORT = 8500
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
HTTP2_WINDOW_BYTES = 4 << 20
# TF Serving replays at most this many warm-up records per version.
MAX_WARMUP_RECORDS = 1000
_GRPC_CODE = {c.value[0]: c for c in grpc.StatusCode}
_TF_OK = 0


class ServingError(Exception):
    """A request error with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(msg):
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def _not_found(msg):
    return ServingError(grpc.StatusCode.NOT_FOUND, msg)


# ---------------------------------------------------------------------------------------------
# Config


def read_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parses a text-format ModelServerConfig file (TF Serving's ``--model_config_file``)."""
    with open(path, encoding="utf-8") as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    validate_config(config)
    return config


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Raises ValueError for configs this server cannot serve."""
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("only model_config_list configs are supported")
    names = set()
    for mc in config.model_config_list.config:
        if not mc.name:
            raise ValueError("a model config has no name")
        if mc.name in names:
            raise ValueError(f"model {mc.name!r} configured twice")
        names.add(mc.name)
        if not mc.base_path:
            raise ValueError(f"model {mc.name!r} has no base_path")
        if mc.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {mc.name!r}: platform {mc.model_platform!r} is not 'tensorflow'")
        policy = mc.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise ValueError(f"model {mc.name!r}: a specific version policy needs versions")


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config of ``--model_name``/``--model_base_path`` (latest version only)."""
    config = model_server_config_pb2.ModelServerConfig()
    mc = config.model_config_list.config.add()
    mc.name, mc.base_path, mc.model_platform = name, base_path, "tensorflow"
    return config


def list_versions(model_path: str) -> dict[int, str]:
    """{version: directory} of the integer-named SavedModel directories under ``model_path``.

    Hidden or non-integer names (temporary copies of exporters and sync) are not versions.
    """
    try:
        names = os.listdir(model_path)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if name.isdigit():
            path = os.path.join(model_path, name)
            if os.path.exists(os.path.join(path, "saved_model.pb")):
                out[int(name)] = path
    return out


def aspired_versions(available, policy) -> set[int]:
    """The versions a ``ServableVersionPolicy`` wants served, out of those on disk."""
    available = sorted(available)
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return set(available)
    if kind == "specific":
        return set(available) & set(policy.specific.versions)
    n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return set(available[-n:])


# ---------------------------------------------------------------------------------------------
# A loaded version


class Signature:
    """One signature of a loaded version, run through cached Session callables."""

    def __init__(self, name: str, sig_def, session):
        self.name = name
        self.method = sig_def.method_name
        self.sig_def = sig_def
        self.input_keys = tuple(sorted(sig_def.inputs))
        self.output_keys = tuple(sorted(sig_def.outputs))
        self.inputs = {k: sig_def.inputs[k] for k in self.input_keys}
        # Per input: (dtype, shape the signature needs or None for unknown rank), read once, not per request.
        self._input_specs = {k: (info.dtype, None if info.tensor_shape.unknown_rank
                                 else [d.size for d in info.tensor_shape.dim]) for k, info in self.inputs.items()}
        self._input_names = [sig_def.inputs[k].name for k in self.input_keys]
        self._output_names = {k: sig_def.outputs[k].name for k in self.output_keys}
        self._session = session
        self._callables = {}
        self._lock = threading.Lock()
        # The callable handle is cheap; TF builds and optimizes the executor on its first run
        # (0.4 s for DeepFM here), which is why warm-up requests run before a version serves.
        self.callable(self.output_keys)

    def callable(self, output_keys: tuple):
        fn = self._callables.get(output_keys)
        if fn is None:
            with self._lock:
                fn = self._callables.get(output_keys)
                if fn is None:
                    fn = self._session.make_callable([self._output_names[k] for k in output_keys],
                                                     feed_list=self._input_names)
                    self._callables[output_keys] = fn
        return fn

    def check_input(self, key: str, proto) -> np.ndarray:
        """The request tensor ``key`` as an array, checked against the signature's dtype and shape."""
        dtype, want = self._input_specs[key]
        if proto.dtype != dtype:
            raise _invalid(f"input {key!r} of signature {self.name!r} must be {protocol.dtype_name(dtype)}, "
                           f"got {protocol.dtype_name(proto.dtype)}")
        try:
            arr = protocol.to_ndarray(proto)
        except protocol.TensorError as e:
            raise _invalid(f"input {key!r}: {e}") from None
        if want is not None and (len(want) != arr.ndim or any(w >= 0 and w != a for w, a in zip(want, arr.shape))):
            raise _invalid(f"input {key!r} of signature {self.name!r} has shape {list(arr.shape)}, "
                           f"the signature needs {want} (-1: any)")
        return arr

    def run(self, feeds: list, output_keys: tuple) -> list[np.ndarray]:
        try:
            return self.callable(output_keys)(*feeds)
        except tf.errors.OpError as e:
            raise ServingError(_GRPC_CODE.get(e.error_code, grpc.StatusCode.INTERNAL), e.message) from None
        except UnicodeDecodeError:
            # TF quotes the offending input bytes in its error message, which then fails to decode:
            # it was a malformed input (e.g. bytes that are not a serialized tf.Example).
            raise _invalid(f"signature {self.name!r} rejected the input (TF's error message quotes "
                           f"non-UTF-8 input bytes)") from None


class LoadedVersion:
    """One version in its own Graph and Session; counts the requests running on it."""

    def __init__(self, model_name: str, version: int, path: str, session_config=None):
        self.model_name = model_name
        self.version = version
        self.path = path
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config)
        try:
            with self.graph.as_default():
                meta = tf.compat.v1.saved_model.loader.load(self.session, [SERVE_TAG], path)
            self.signature_defs = dict(meta.signature_def)
            self.signatures = {name: Signature(name, sd, self.session) for name, sd in self.signature_defs.items()
                               if sd.inputs and sd.outputs}
        except Exception:
            self.session.close()
            raise
        self.warmup_requests = 0  # warm-up records replayed before the version took traffic
        self._cv = threading.Condition()
        self._inflight = 0
        self._retired = False

    def signature(self, name: str) -> Signature:
        sig = self.signatures.get(name or DEFAULT_SIGNATURE)
        if sig is None:
            raise _not_found(f"signature {name or DEFAULT_SIGNATURE!r} not found in model {self.model_name!r} "
                             f"version {self.version} (signatures: {sorted(self.signatures)})")
        return sig

    def acquire(self) -> bool:
        """Counts a request in; False once the version is unloading (the caller re-resolves)."""
        with self._cv:
            if self._retired:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._cv:
            self._inflight -= 1
            if self._inflight == 0:
                self._cv.notify_all()

    def retire(self) -> None:
        """Refuses new requests, waits for the running ones, closes the Session."""
        with self._cv:
            self._retired = True
            self._cv.wait_for(lambda: self._inflight == 0)
        self.session.close()


# ---------------------------------------------------------------------------------------------
# Models and the manager


class ServedModel:
    """A configured model: its loaded versions (an immutable snapshot swapped whole), labels, statuses."""

    def __init__(self, config: model_server_config_pb2.ModelConfig, base_path: str):
        self.name = config.name
        self.base_path = base_path
        self.config = config
        self.versions: dict[int, LoadedVersion] = {}
        self.statuses: dict[int, tuple[int, int, str]] = {}  # version -> (state, error code, message)
        self.failures = collections.Counter()
        self._status_lock = threading.Lock()  # the poller and unloading threads both update statuses

    @property
    def labels(self) -> dict[str, int]:
        return dict(self.config.version_labels)

    def set_status(self, version: int, state: int, code: int = _TF_OK, message: str = "") -> None:
        with self._status_lock:
            self.statuses = {**self.statuses, version: (state, code, message)}


class ModelManager:
    """Loads, warms up, swaps and unloads versions of the configured models.

    Args:
      config: the ModelServerConfig.
      base_path: if set, replaces the directory part of every model's base_path.
      session_config: ConfigProto of every version's Session.
      enable_warmup: replay ``assets.extra/tf_serving_warmup_requests`` before a version serves.
      max_load_retries: polls that retry a version whose load failed.
    """

    def __init__(self, config, base_path: str | None = None, session_config=None, enable_warmup: bool = True,
                 max_load_retries: int = 5):
        self._base_override = base_path
        self._session_config = session_config
        self._enable_warmup = enable_warmup
        self._max_load_retries = max_load_retries
        self.models: dict[str, ServedModel] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = None
        self._retiring: list[threading.Thread] = []
        self.handlers = Handlers(self)
        # Directories a client-sent config (ReloadConfig RPC) may name base paths in.
        self.roots = ([base_path] if base_path else
                      sorted({os.path.dirname(os.path.abspath(mc.base_path.rstrip("/")))
                              for mc in config.model_config_list.config}))
        self.apply_config(config)

    def _model_path(self, mc) -> str:
        if self._base_override:
            name = paths.plain_name(os.path.basename(mc.base_path.rstrip("/")), f"model {mc.name!r}: base path name")
            return paths.within(self._base_override, name, f"model {mc.name!r}: base path")
        return mc.base_path

    def check_request_config(self, config) -> None:
        """Raises ValueError unless every base path of a client-sent config lies inside ``roots``."""
        validate_config(config)
        for mc in config.model_config_list.config:
            path = self._model_path(mc)
            if not any(paths.is_within(root, path) for root in self.roots):
                raise ValueError(f"model {mc.name!r}: base path {mc.base_path!r} is outside the server's "
                                 f"roots {self.roots}")

    def apply_config(self, config) -> None:
        """Adds, updates and removes models to match ``config``, then loads their versions."""
        validate_config(config)
        for mc in config.model_config_list.config:
            self._model_path(mc)  # raises before anything changes
        with self._lock:
            new = {mc.name: mc for mc in config.model_config_list.config}
            models = dict(self.models)
            for name in list(models):
                if name not in new or self._model_path(new[name]) != models[name].base_path:
                    old = models.pop(name)
                    self.models = models
                    for v in sorted(old.versions):
                        self._retire(old, v)
            for name, mc in new.items():
                if name in models:
                    models[name].config = mc
                else:
                    models[name] = ServedModel(mc, self._model_path(mc))
                    log.info("model %s: base path %s", name, models[name].base_path)
            self.models = models
            self.poll()

    def poll(self) -> None:
        """One pass over every model's base path: load aspired versions, then unload the others."""
        with self._lock:
            for model in list(self.models.values()):
                self._poll_model(model)

    def _poll_model(self, model: ServedModel) -> None:
        on_disk = list_versions(model.base_path)
        aspired = aspired_versions(on_disk, model.config.model_version_policy)
        for v in sorted(aspired - set(model.versions), reverse=True):
            if model.failures[v] <= self._max_load_retries:
                self._load(model, v, on_disk[v])
        serving_aspired = aspired & set(model.versions)
        # Availability preserving: the old versions go once an aspired one serves (or nothing is aspired).
        if serving_aspired or not aspired:
            for v in sorted(set(model.versions) - aspired):
                self._retire(model, v)

    def _load(self, model: ServedModel, version: int, path: str) -> None:
        model.set_status(version, State.LOADING)
        start = time.time()
        try:
            with _short_gil_slices():
                lv = LoadedVersion(model.name, version, path, self._session_config)
        except Exception as e:  # a broken version must not take the server down
            model.failures[version] += 1
            model.set_status(version, State.END, grpc.StatusCode.UNKNOWN.value[0], f"load failed: {e}")
            log.error("model %s version %d: load failed (%s)", model.name, version, e)
            return
        try:
            with _short_gil_slices():
                n = self.warmup(lv) if self._enable_warmup else 0
        except Exception as e:
            lv.retire()
            model.failures[version] += 1
            model.set_status(version, State.END, grpc.StatusCode.UNKNOWN.value[0], f"warm-up failed: {e}")
            log.error("model %s version %d: warm-up failed (%s)", model.name, version, e)
            return
        lv.warmup_requests = n
        model.versions = {**model.versions, version: lv}  # the switch: new requests see it from here
        model.set_status(version, State.AVAILABLE)
        log.info("model %s version %d: available (loaded and %d warm-up requests in %.2fs)",
                 model.name, version, n, time.time() - start)

    def _retire(self, model: ServedModel, version: int) -> None:
        lv = model.versions.get(version)
        if lv is None:
            return
        model.versions = {v: x for v, x in model.versions.items() if v != version}
        model.set_status(version, State.UNLOADING)

        def finish():
            lv.retire()
            model.set_status(version, State.END)
            log.info("model %s version %d: unloaded", model.name, version)

        t = threading.Thread(target=finish, name=f"retire-{model.name}-{version}", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]

    def warmup(self, lv: LoadedVersion) -> int:
        """Replays the version's warm-up records through the request path; returns how many."""
        path = os.path.join(lv.path, protocol.ASSETS_EXTRA, protocol.WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        n = 0
        for record in tf.compat.v1.io.tf_record_iterator(path):
            if n >= MAX_WARMUP_RECORDS:
                break
            entry = prediction_log_pb2.PredictionLog.FromString(record)
            kind = entry.WhichOneof("log_type")
            if kind == "predict_log":
                self.handlers.predict_on(lv, entry.predict_log.request)
            elif kind == "classify_log":
                self.handlers.classify_on(lv, entry.classify_log.request)
            elif kind == "regress_log":
                self.handlers.regress_on(lv, entry.regress_log.request)
            else:
                raise ValueError(f"unsupported warm-up record type {kind!r}")
            n += 1
        return n

    def acquire(self, spec) -> LoadedVersion:
        """The version a ModelSpec asks for, counted in (call ``release`` on it after the request).

        Raises:
          ServingError: NOT_FOUND (model, version, label target), INVALID_ARGUMENT (no name, unknown label).
        """
        if not spec.name:
            raise _invalid("model_spec.name is empty")
        for _ in range(10):  # re-resolve if the version starts unloading in between
            lv = self._resolve(spec)
            if lv.acquire():
                return lv
        raise ServingError(grpc.StatusCode.UNAVAILABLE, f"model {spec.name!r}: versions are being swapped")

    def _resolve(self, spec) -> LoadedVersion:
        model = self.models.get(spec.name)
        if model is None:
            raise _not_found(f"model {spec.name!r} not found (models: {sorted(self.models)})")
        versions = model.versions
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            lv = versions.get(spec.version.value)
            if lv is None:
                raise _not_found(f"model {spec.name!r} version {spec.version.value} is not available "
                                 f"(available: {sorted(versions)})")
            return lv
        if choice == "version_label":
            target = model.labels.get(spec.version_label)
            if target is None:
                raise _invalid(f"model {spec.name!r}: unknown version label {spec.version_label!r} "
                               f"(labels: {model.labels})")
            lv = versions.get(target)
            if lv is None:
                raise _not_found(f"model {spec.name!r}: label {spec.version_label!r} points to version {target}, "
                                 f"which is not available (available: {sorted(versions)})")
            return lv
        if not versions:
            raise _not_found(f"model {spec.name!r} has no available version")
        return versions[max(versions)]

    def start(self, poll_wait_s: float, config_path: str | None = None, config_poll_s: float = 0.0) -> None:
        """Starts the poller thread (base paths every ``poll_wait_s``, the config file every ``config_poll_s``)."""
        if poll_wait_s <= 0 and config_poll_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, args=(poll_wait_s, config_path, config_poll_s),
                                        name="model-poller", daemon=True)
        self._thread.start()

    def _run(self, poll_wait_s, config_path, config_poll_s):
        # Loading a version is mostly Python graph import holding the GIL: at a lower OS priority
        # (nice +10 for this thread only) it yields the cores to the request threads.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
        except (AttributeError, OSError):
            pass
        last_config = _read_text(config_path) if config_path else None
        next_poll = next_config = time.monotonic()
        waits = [w for w in (poll_wait_s, config_poll_s) if w > 0]
        while not self._stop.wait(min(waits)):
            now = time.monotonic()
            try:
                if config_path and config_poll_s > 0 and now >= next_config:
                    next_config = now + config_poll_s
                    text = _read_text(config_path)
                    if text != last_config:
                        last_config = text
                        log.info("config %s changed: applying it", config_path)
                        self.apply_config(read_config(config_path))
                if poll_wait_s > 0 and now >= next_poll:
                    next_poll = now + poll_wait_s
                    self.poll()
            except Exception:  # a bad config or filesystem hiccup must not stop the poller
                log.exception("model poller")

    def stop(self) -> None:
        """Stops polling and unloads every version (waiting for running requests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            for model in self.models.values():
                for v in sorted(model.versions):
                    self._retire(model, v)
        for t in self._retiring:
            t.join()


_SLICES_LOCK = threading.Lock()
_SLICES_USERS = [0, 0.0]  # loads in progress, the switch interval to restore


class _short_gil_slices:
    """While a version loads, the interpreter hands the GIL over every 0.5 ms instead of 5 ms.

    A request thread that needs the GIL (to decode a request or encode a response) otherwise waits
    up to a whole 5 ms slice of the loading thread: the latency spike of a swap.
    """

    SLICE_S = 0.0005

    def __enter__(self):
        with _SLICES_LOCK:
            if _SLICES_USERS[0] == 0:
                _SLICES_USERS[1] = sys.getswitchinterval()
                sys.setswitchinterval(min(self.SLICE_S, _SLICES_USERS[1]))
            _SLICES_USERS[0] += 1

    def __exit__(self, *exc):
        with _SLICES_LOCK:
            _SLICES_USERS[0] -= 1
            if _SLICES_USERS[0] == 0:
                sys.setswitchinterval(_SLICES_USERS[1])


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# Request handling (protocol logic, independent of gRPC)


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
        raise _invalid("input is empty: set example_list or example_list_with_context")
    if not examples:
        raise _invalid("input has no examples")
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
            raise _invalid(f"signature {sig.name!r} takes inputs {list(sig.input_keys)}, got {sorted(inputs)}")
        feeds = [sig.check_input(k, inputs[k]) for k in sig.input_keys]
        if req.output_filter:
            unknown = [k for k in req.output_filter if k not in sig.output_keys]
            if unknown:
                raise _invalid(f"output_filter {unknown} not in the outputs {list(sig.output_keys)} of {sig.name!r}")
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
            raise _invalid(f"{api} needs a signature of method {method}; {sig.name!r} is {sig.method!r}")
        if sig.input_keys != (protocol.CLASSIFY_INPUTS,):
            raise _invalid(f"signature {sig.name!r} must have the one input {protocol.CLASSIFY_INPUTS!r}")
        return sig, _serialized_examples(req.input)

    def classify_on(self, lv: LoadedVersion, req) -> classification_pb2.ClassificationResponse:
        sig, examples = self._run_examples(lv, req, CLASSIFY_METHOD, "Classify")
        keys = tuple(k for k in (protocol.CLASSIFY_CLASSES, protocol.CLASSIFY_SCORES) if k in sig.output_keys)
        if not keys:
            raise _invalid(f"signature {sig.name!r} has neither classes nor scores")
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
            raise _invalid(f"signature {sig.name!r} has no {protocol.REGRESS_OUTPUTS!r} output")
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
            raise _invalid("metadata_field is empty: ask for 'signature_def'")
        unknown = [f for f in req.metadata_field if f != "signature_def"]
        if unknown:
            raise _invalid(f"metadata fields {unknown} are not supported (only 'signature_def')")
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
            raise _invalid("model_spec.name is empty")
        model = self.manager.models.get(spec.name)
        if model is None:
            raise _not_found(f"model {spec.name!r} not found (models: {sorted(self.manager.models)})")
        statuses = model.statuses
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            target = model.labels.get(spec.version_label)
            if target is None:
                raise _invalid(f"model {spec.name!r}: unknown version label {spec.version_label!r}")
            wanted = [target]
        elif choice == "version":
            wanted = [spec.version.value]
        else:
            wanted = sorted(statuses)
        resp = get_model_status_pb2.GetModelStatusResponse()
        for v in wanted:
            if v not in statuses:
                raise _not_found(f"model {spec.name!r} version {v} is unknown (versions: {sorted(statuses)})")
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
            raise _invalid(f"config rejected: {e}") from None
        resp = model_management_pb2.ReloadConfigResponse()
        resp.status.error_code = _TF_OK
        return resp


# ---------------------------------------------------------------------------------------------
# gRPC


def _rpc(fn):
    def handler(self, request, context):
        try:
            return fn(request)
        except ServingError as e:
            context.abort(e.code, e.message)
        except Exception as e:  # keep serving; report the bug to the caller
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
    return handler


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService`` (MultiInference is not implemented: UNIMPLEMENTED)."""

    def __init__(self, handlers: Handlers):
        self.Predict = _rpc(handlers.predict).__get__(self)
        self.Classify = _rpc(handlers.classify).__get__(self)
        self.Regress = _rpc(handlers.regress).__get__(self)
        self.GetModelMetadata = _rpc(handlers.metadata).__get__(self)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``."""

    def __init__(self, handlers: Handlers):
        self.GetModelStatus = _rpc(handlers.status).__get__(self)
        self.HandleReloadConfigRequest = _rpc(handlers.reload_config).__get__(self)


class Server:
    """The gRPC server around a ModelManager.

    Args:
      manager: the loaded models.
      host: interface to bind (127.0.0.1: loopback only).
      port: TCP port; 0 picks a free one (``start`` returns it).
      max_workers: request threads.
      max_message_bytes: cap on request and response size.
    """

    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.manager = manager
        self.host = host
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes),
                     # a 100-ad request (~70 KB) fits the first HTTP/2 window: no WINDOW_UPDATE round trip
                     ("grpc.http2.lookahead_bytes", HTTP2_WINDOW_BYTES),
                     ("grpc.so_reuseport", 0)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(manager.handlers), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager.handlers), self._server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot bind {address}")

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> int:
        self._server.start()
        return self.port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stops accepting requests, lets running ones finish (up to ``grace`` s), unloads the models."""
        self._server.stop(grace).wait()
        self.manager.stop()


def session_config(intra_op: int = 1, inter_op: int = -1):
    """The ConfigProto of every version's Session.

    ``inter_op=-1`` runs a request's ops in the request's own thread (TF's "negative: caller's
    thread"): no hand-off to the inter-op pool per op, which on this project's small graphs cost
    more than the ops (in-process p50 on a 2-core VM, 0 vs -1: DeepFM 1 ad 0.54 vs 0.38 ms, 100 ads
    2.26 vs 1.88 ms; the seed-shape MLP 1 ad 1.06 vs 0.83 ms). ``intra_op=1`` keeps a request on one
    core: splitting its matmuls over the Eigen pool did not make the in-process call faster on that
    VM, while the pool's spinning threads held the cores the gRPC threads needed (gRPC p50 at 100 ads,
    intra-op 0 vs 1: MLP 6.30 vs 4.64 ms, DeepFM 2.42 vs 1.78 ms, same floor). Concurrency comes from
    the gRPC threads. On a many-core host serving few, large requests, raise ``intra_op``.
    """
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op, inter_op_parallelism_threads=inter_op,
                                    allow_soft_placement=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Local TF-Serving-protocol gRPC server (PredictionService, "
                                            "ModelService) over SavedModel version directories.")
    p.add_argument("--model_config_file", default="", help="text ModelServerConfig (model_config_list)")
    p.add_argument("--base_path", default="",
                   help="replaces the directory of every model's base_path (/models/fm -> BASE_PATH/fm)")
    p.add_argument("--model_name", default="", help="single model without a config file")
    p.add_argument("--model_base_path", default="", help="its base path (holds integer version directories)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: a free one, printed)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="seconds between scans of the base paths for new versions (0: never)")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                   help="seconds between re-reads of the config file (0: never)")
    p.add_argument("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--grpc_max_threads", type=int, default=8)
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=1,
                   help="threads one op may use (1, default: a request stays on one core; 0: TF's choice)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=-1,
                   help="-1 (default): ops run in the request's thread; 0: TF's pool")
    p.add_argument("--enable_model_warmup", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--max_num_load_retries", type=int, default=5)
    args = p.parse_args(argv)
    if bool(args.model_config_file) == bool(args.model_name):
        p.error("pass either --model_config_file or --model_name with --model_base_path")
    if args.model_name and not args.model_base_path:
        p.error("--model_name needs --model_base_path")
    return args


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tf.get_logger().setLevel(logging.ERROR)  # the TF1 loader's deprecation notices are expected here
    config = (read_config(args.model_config_file) if args.model_config_file
              else single_model_config(args.model_name, args.model_base_path))
    manager = ModelManager(config, base_path=args.base_path or None,
                           session_config=session_config(args.tensorflow_intra_op_parallelism,
                                                         args.tensorflow_inter_op_parallelism),
                           enable_warmup=args.enable_model_warmup, max_load_retries=args.max_num_load_retries)
    server = Server(manager, args.host, args.port, args.grpc_max_threads, args.max_message_bytes)
    server.start()
    manager.start(args.file_system_poll_wait_seconds, args.model_config_file or None,
                  args.model_config_file_poll_wait_seconds)
    loaded = {name: sorted(m.versions) for name, m in manager.models.items()}
    print(f"serving: listening on {server.target}; models and versions {loaded}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("serving: shutting down", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
