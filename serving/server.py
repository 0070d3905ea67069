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
  ``tf.compat.v1.saved_model.loader.load`` into its own Session (the graph
  imported in short steps: ``serving.manager.load_saved_model``), its
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
import gc
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
import tensorflow as tf
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.config import (aspired_versions, list_versions, models_under, read_config, single_model_config,
                            validate_config)
from serving.errors import ServingError
from serving.executor import HotThreadExecutor
from serving.handlers import Handlers
from serving.manager import LoadedVersion, ModelManager, ServedModel, Signature

# The module is the server's entry point; these names are its public API (tests, bench, sync).
__all__ = ["aspired_versions", "list_versions", "models_under", "read_config", "single_model_config", "validate_config",
           "ServingError", "Handlers", "LoadedVersion", "ModelManager", "ServedModel", "Signature", "Server",
           "session_config", "main"]

log = logging.getLogger("serving.server")

DEFAULT_PORT = 8500
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
HTTP2_WINDOW_BYTES = 4 << 20


# ---------------------------------------------------------------------------------------------
# gRPC


def _rpc(fn):
    def handler(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Waited in the queue past the caller's deadline: the answer would be thrown away.
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it ran")
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
      max_concurrent_requests: requests admitted at once (running or queued for a thread); gRPC
        answers any request beyond them with RESOURCE_EXHAUSTED at once, so an overload sheds load
        instead of queueing without bound (0: no limit). Default ``default_max_concurrent()``.
      hot_threads: run each request on the request thread that went idle last
        (``serving.executor.HotThreadExecutor``) instead of ``ThreadPoolExecutor``'s longest-idle one.
    """

    def __init__(self, manager: ModelManager, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_workers: int = 8, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_concurrent_requests: int | None = None, hot_threads: bool = True):
        self.manager = manager
        self.host = host
        limit = default_max_concurrent() if max_concurrent_requests is None else max_concurrent_requests
        self.max_concurrent_requests = limit
        pool = HotThreadExecutor if hot_threads else futures.ThreadPoolExecutor
        self._server = grpc.server(
            pool(max_workers=max_workers, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=limit or None,
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


GIL_SWITCH_S = 0.001


def freeze_startup_objects() -> None:
    """Moves every object alive now (TensorFlow's and gRPC's modules: ~320k) out of the cyclic GC's reach.

    A full collection otherwise walks them all while holding the GIL: 150 ms of CPU here, a stall of
    every request thread whenever the allocations of a version load trigger one. Frozen objects are
    never collected, so this runs before any version loads: the graphs of retired versions stay
    collectable (a full collection that frees one: ~7 ms).
    """
    gc.collect()
    gc.freeze()


def default_max_concurrent() -> int:
    """Admitted requests by default: one per core but one (at least one).

    Each request computes on one core (``session_config``). The core left over runs gRPC's
    poller, which admits and sheds every incoming request in Python: with every core computing,
    an overload's rejections compete with the accepted requests for the cores: at 100 ads on 2
    cores accepted p99 reached 13x steady with two in flight, 1.65-2.62x with one
    (docs/RELIABILITY.md, ``bench.bench_overload``). The price is peak throughput on a small host
    (2 cores: 452-529 against 764 requests/s closed loop); ``--max_concurrent_requests`` raises it.
    Clients retry a shed request with backoff (``serving.client``), so bursts above the limit cost
    a retry, not a failure.
    """
    return max(1, (os.cpu_count() or 1) - 1)


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
    p.add_argument("--export_base", default="",
                   help="serve every model exported under this directory (<dir>/<model>/<version>), or only "
                        "--model_name; what `make serve` uses")
    p.add_argument("--model_name", default="", help="single model (with --model_base_path or --export_base)")
    p.add_argument("--model_base_path", default="", help="its base path (holds integer version directories)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (0: a free one, printed)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="seconds between scans of the base paths for new versions (0: never)")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0.0,
                   help="seconds between re-reads of the config file (0: never)")
    p.add_argument("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    p.add_argument("--grpc_max_threads", type=int, default=8)
    p.add_argument("--grpc_hot_threads", type=int, default=1,
                   help="1 (default): a request runs on the request thread that went idle last (warm caches); "
                        "0: concurrent.futures.ThreadPoolExecutor's choice (the longest idle)")
    p.add_argument("--max_concurrent_requests", type=int, default=None,
                   help="requests admitted at once; more get RESOURCE_EXHAUSTED at once "
                        "(default: cores - 1, at least 1; 0: no limit)")
    p.add_argument("--tensorflow_intra_op_parallelism", type=int, default=1,
                   help="threads one op may use (1, default: a request stays on one core; 0: TF's choice)")
    p.add_argument("--tensorflow_inter_op_parallelism", type=int, default=-1,
                   help="-1 (default): ops run in the request's thread; 0: TF's pool")
    p.add_argument("--enable_model_warmup", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--max_num_load_retries", type=int, default=5)
    args = p.parse_args(argv)
    if sum(map(bool, (args.model_config_file, args.export_base, args.model_base_path))) != 1:
        p.error("pass one of --model_config_file, --export_base [--model_name], --model_name with --model_base_path")
    if args.model_base_path and not args.model_name:
        p.error("--model_base_path needs --model_name")
    return args


def server_config(args):
    """The ModelServerConfig the flags ask for (a clear error when there is nothing to serve)."""
    if args.model_config_file:
        return read_config(args.model_config_file)
    if args.export_base:
        return models_under(args.export_base, args.model_name)
    return single_model_config(args.model_name, args.model_base_path)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Hand the GIL over every 1 ms (Python's default is 5): gRPC's poller, which admits or sheds each
    # incoming request, waits less behind the request threads' Python.
    sys.setswitchinterval(GIL_SWITCH_S)
    tf.get_logger().setLevel(logging.ERROR)  # the TF1 loader's deprecation notices are expected here
    try:
        config = server_config(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"serving: {e}") from None
    freeze_startup_objects()
    manager = ModelManager(config, base_path=args.base_path or None,
                           session_config=session_config(args.tensorflow_intra_op_parallelism,
                                                         args.tensorflow_inter_op_parallelism),
                           enable_warmup=args.enable_model_warmup, max_load_retries=args.max_num_load_retries)
    server = Server(manager, args.host, args.port, args.grpc_max_threads, args.max_message_bytes,
                    args.max_concurrent_requests, bool(args.grpc_hot_threads))
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
