"""Loaded versions and the model manager: load, warm up, swap and unload versions as TF Serving does.

Each version lives in its own Graph and Session (``tf.compat.v1.saved_model.loader.load``), its
signatures run through cached Session callables; the manager polls base paths, applies version
policies and labels, replays warm-up records before a version takes traffic, and retires old
versions once their running requests finish. ``serving.server`` documents the behaviour.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.python.framework import function as tf_function
from tensorflow.python.saved_model import loader_impl
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from feature_schema import paths
from serving import protocol
from serving.config import aspired_versions, list_versions, read_config, validate_config
from serving.errors import GRPC_CODE, TF_OK, ServingError, invalid, not_found
from serving.handlers import Handlers
from serving.protocol import DEFAULT_SIGNATURE, SERVE_TAG

log = logging.getLogger("serving.server")

State = get_model_status_pb2.ModelVersionStatus.State
# TF Serving replays at most this many warm-up records per version.
MAX_WARMUP_RECORDS = 1000
# Ops that call a graph function (a TF2 SavedModel's signatures, initializers, save and restore).
CALL_OPS = frozenset({"StatefulPartitionedCall", "PartitionedCall"})


def load_saved_model(session, path: str):
    """``tf.compat.v1.saved_model.loader.load(session, [serve], path)``, importing the graph in short steps.

    The loader imports the whole GraphDef in one C call that holds the GIL; a request thread that
    needs the GIL meanwhile waits for all of it (DeepFM: ~50 ms of CPU, the stall of every swap). Two
    changes, both before the loader's own steps (graph import, variable restore, init ops) run
    unchanged on the same MetaGraphDef:

    * the function library is added one function per C call (about 1 ms or less each) and left out of the
      GraphDef, which the importer would otherwise add in the same single call;
    * call ops get ``_disable_call_shape_inference``: the Python graph's shape refiner would
      otherwise infer shapes through every signature's function body at import (over half of the
      call). TF Serving's C++ loader does no such inference (its graph conversion has no function
      library for shape inference); outputs keep the shapes of the SignatureDefs, and at run time
      the function runtime infers shapes as before.

    Returns:
      The MetaGraphDef, as the loader returns it (its GraphDef without the function library).
    """
    loader = loader_impl.SavedModelLoader(path)
    meta = loader.get_meta_graph_def_from_tags([SERVE_TAG])  # the loader's own proto: what it imports
    graph_def = meta.graph_def
    with session.graph.as_default():
        for fn in tf_function.from_library(graph_def.library):
            fn.add_to_graph(session.graph)
    graph_def.ClearField("library")
    for node in graph_def.node:
        if node.op in CALL_OPS:
            node.attr["_disable_call_shape_inference"].b = True
    with session.graph.as_default():
        return loader.load(session, [SERVE_TAG])


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
            raise invalid(f"input {key!r} of signature {self.name!r} must be {protocol.dtype_name(dtype)}, "
                           f"got {protocol.dtype_name(proto.dtype)}")
        try:
            arr = protocol.to_ndarray(proto)
        except protocol.TensorError as e:
            raise invalid(f"input {key!r}: {e}") from None
        if want is not None and (len(want) != arr.ndim or any(w >= 0 and w != a for w, a in zip(want, arr.shape))):
            raise invalid(f"input {key!r} of signature {self.name!r} has shape {list(arr.shape)}, "
                           f"the signature needs {want} (-1: any)")
        return arr

    def run(self, feeds: list, output_keys: tuple) -> list[np.ndarray]:
        try:
            return self.callable(output_keys)(*feeds)
        except tf.errors.OpError as e:
            raise ServingError(GRPC_CODE.get(e.error_code, grpc.StatusCode.INTERNAL), e.message) from None
        except UnicodeDecodeError:
            # TF quotes the offending input bytes in its error message, which then fails to decode:
            # it was a malformed input (e.g. bytes that are not a serialized tf.Example).
            raise invalid(f"signature {self.name!r} rejected the input (TF's error message quotes "
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
            meta = load_saved_model(self.session, path)
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
            raise not_found(f"signature {name or DEFAULT_SIGNATURE!r} not found in model {self.model_name!r} "
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

    def set_status(self, version: int, state: int, code: int = TF_OK, message: str = "") -> None:
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
        self._watchdog = None  # started with the poller (loads before it run at the caller's priority)
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
            with _short_gil_slices(), self._watched(f"model {model.name} version {version}"):
                lv = LoadedVersion(model.name, version, path, self._session_config)
        except Exception as e:  # a broken version must not take the server down
            model.failures[version] += 1
            model.set_status(version, State.END, grpc.StatusCode.UNKNOWN.value[0], f"load failed: {e}")
            log.error("model %s version %d: load failed (%s)", model.name, version, e)
            return
        try:
            with _short_gil_slices(), self._watched(f"model {model.name} version {version}"):
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

    def _watched(self, what: str):
        """The poller's load of ``what``, watched for starvation (``_LoadWatchdog``)."""
        return self._watchdog.watch(what) if self._watchdog is not None else contextlib.nullcontext()

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
            raise invalid("model_spec.name is empty")
        for _ in range(10):  # re-resolve if the version starts unloading in between
            lv = self._resolve(spec)
            if lv.acquire():
                return lv
        raise ServingError(grpc.StatusCode.UNAVAILABLE, f"model {spec.name!r}: versions are being swapped")

    def _resolve(self, spec) -> LoadedVersion:
        model = self.models.get(spec.name)
        if model is None:
            raise not_found(f"model {spec.name!r} not found (models: {sorted(self.models)})")
        versions = model.versions
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            lv = versions.get(spec.version.value)
            if lv is None:
                raise not_found(f"model {spec.name!r} version {spec.version.value} is not available "
                                 f"(available: {sorted(versions)})")
            return lv
        if choice == "version_label":
            target = model.labels.get(spec.version_label)
            if target is None:
                raise invalid(f"model {spec.name!r}: unknown version label {spec.version_label!r} "
                               f"(labels: {model.labels})")
            lv = versions.get(target)
            if lv is None:
                raise not_found(f"model {spec.name!r}: label {spec.version_label!r} points to version {target}, "
                                 f"which is not available (available: {sorted(versions)})")
            return lv
        if not versions:
            raise not_found(f"model {spec.name!r} has no available version")
        return versions[max(versions)]

    def start(self, poll_wait_s: float, config_path: str | None = None, config_poll_s: float = 0.0) -> None:
        """Starts the poller thread (base paths every ``poll_wait_s``, the config file every ``config_poll_s``)."""
        if poll_wait_s <= 0 and config_poll_s <= 0:
            return
        self._watchdog = _LoadWatchdog()
        self._thread = threading.Thread(target=self._run, args=(poll_wait_s, config_path, config_poll_s),
                                        name="model-poller", daemon=True)
        self._thread.start()

    def _run(self, poll_wait_s, config_path, config_poll_s):
        _idle_cpu_only()
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
            self._watchdog.close()
        with self._lock:
            for model in self.models.values():
                for v in sorted(model.versions):
                    self._retire(model, v)
        for t in self._retiring:
            t.join()


# A load on the idle-priority poller that has not finished after this long (a server saturated by
# requests leaves it almost no CPU) continues at nice +10 (``_LoadWatchdog``).
LOAD_IDLE_GRACE_S = 10.0
LOAD_NICE = 10


def _idle_cpu_only() -> None:
    """Runs the calling thread (the poller: loads, warm-ups, unloads) on the CPU the request threads leave idle.

    Under ``SCHED_IDLE`` (Linux) the scheduler preempts the thread as soon as any other thread
    wakes on its core. A load at a nice value keeps the core for the rest of its time slice (about
    3 ms under EEVDF) while a request thread waits: that wait was the latency of requests during a
    swap (restoring the MLP's 26 MB of variables: ~22 ms of thread CPU, ``bench.swap_phases``).
    Threads this thread starts inherit the policy (its unloading threads); the gRPC threads and
    TF's compute pool start from the main thread, which loads the first versions. Elsewhere (or
    not permitted) the thread runs at nice +``LOAD_NICE``.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        _renice(threading.get_native_id(), LOAD_NICE)


def _renice(tid: int, nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice))
    except (AttributeError, OSError):
        pass


def _promote(tid: int, what: str, grace_s: float) -> bool:
    """Moves thread ``tid`` from SCHED_IDLE to SCHED_OTHER at nice +``LOAD_NICE``; False if not permitted."""
    try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        log.warning("%s: still loading after %.0f s on idle CPU; not permitted to raise its priority (%s)",
                    what, grace_s, e)
        return False
    _renice(tid, LOAD_NICE)
    log.warning("%s: still loading after %.0f s on idle CPU (the server is saturated): continuing at nice +%d",
                what, grace_s, LOAD_NICE)
    return True


class _LoadWatchdog:
    """Moves a load that outlasts ``grace_s`` on the idle-priority poller to nice +``LOAD_NICE``.

    A server saturated by requests leaves ``SCHED_IDLE`` almost no CPU, so a version would wait as
    long as the saturation lasts. The watchdog is a thread of its own, started by the thread that
    starts the poller and at its priority: a timer started by the poller would inherit the idle
    policy and wait for CPU as long as the load. Moving a thread back needs ``CAP_SYS_NICE`` or an
    ``RLIMIT_NICE`` that allows it; without either the load goes on at idle priority and the log
    says so. The poller returns to idle priority when the load ends.
    """

    def __init__(self, grace_s: float = LOAD_IDLE_GRACE_S):
        self.grace_s = grace_s
        self.promoted = 0  # loads moved to nice +LOAD_NICE
        self._cv = threading.Condition()
        self._load = None  # (thread id, what, deadline) of the load being watched
        self._raised = False  # the watched load was moved
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="load-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what: str):
        """Watches the calling thread's load while the block runs (only if it runs under SCHED_IDLE)."""
        if getattr(os, "SCHED_IDLE", None) is None or os.sched_getscheduler(0) != os.SCHED_IDLE:
            yield
            return
        with self._cv:
            self._load, self._raised = (threading.get_native_id(), what, time.monotonic() + self.grace_s), False
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._load, raised = None, self._raised
                self._cv.notify_all()
            if raised:
                _idle_cpu_only()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                self._cv.wait_for(lambda: self._closed or self._load is not None)
                load = self._load
                if load is None:
                    continue
                self._cv.wait_for(lambda: self._closed or self._load is not load,
                                  timeout=max(0.0, load[2] - time.monotonic()))
                if self._load is load and not self._closed:
                    self._raised = _promote(load[0], load[1], self.grace_s)
                    self.promoted += self._raised
                    self._cv.wait_for(lambda: self._closed or self._load is not load)


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
