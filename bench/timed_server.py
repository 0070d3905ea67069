"""``serving.server`` with some of its functions timed, in a child process, for the serving probes.

    python -m bench.timed_server {swap|request|threads} <serving.server arguments>

Every call of the chosen functions appends (name, start, end, thread CPU) to a list written as JSON
to ``$TIMED_SERVER_OUT`` when the server exits; SIGUSR1 writes ``{native thread id: Python thread
name}`` of the live threads to ``$TIMED_SERVER_OUT.threads``. ``time.perf_counter`` is CLOCK_MONOTONIC, so the
records line up with the client's clock. ``start`` launches it the way ``bench_serving`` launches
the plain server.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import time

OUT_ENV = "TIMED_SERVER_OUT"
# Function to time (attribute path from serving.manager) -> name in the records.
STEPS = {
    "swap": (("loader_impl.SavedModelLoader.load_graph", "graph import"),
             ("loader_impl.SavedModelLoader.restore_variables", "variable restore"),
             ("loader_impl.SavedModelLoader.run_init_ops", "init ops"),
             ("ModelManager.warmup", "warm-up"),
             ("LoadedVersion.retire", "unload")),
    "request": (("Handlers.predict", "handler"),
                ("Signature.run", "session run")),
    "threads": (),  # nothing timed: the plain server, whose thread names SIGUSR1 writes
}


def start(config_path: str, log_path: str, steps: str, out_path: str):
    """(process, target) of the timed server; its records land in ``out_path`` once it is terminated."""
    from bench import bench_serving

    os.environ[OUT_ENV] = out_path
    return bench_serving.start_server(config_path, log_path, module=("bench.timed_server", steps))


def serve(argv: list[str], steps) -> None:
    """``serving.server.main(argv)`` with every function of ``steps`` timed."""
    from serving import manager, server

    records = []
    for attr, name in steps:
        *owner_path, fn_name = attr.split(".")
        owner = manager
        for part in owner_path:
            owner = getattr(owner, part)
        setattr(owner, fn_name, _timed(getattr(owner, fn_name), name, records))

    def dump():
        with open(os.environ[OUT_ENV], "w") as f:
            json.dump(records, f)

    def dump_thread_names(*_):
        with open(os.environ[OUT_ENV] + ".threads", "w") as f:
            json.dump({t.native_id: t.name for t in threading.enumerate()}, f)
    atexit.register(dump)
    signal.signal(signal.SIGUSR1, dump_thread_names)  # handled in the main thread, which only waits
    server.main(argv)


def _timed(fn, name: str, records: list):
    def wrapper(*args, **kwargs):
        t, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            records.append({"step": name, "start": t, "end": time.perf_counter(), "cpu_s": time.thread_time() - cpu})
    return wrapper


if __name__ == "__main__":
    serve(sys.argv[2:], STEPS[sys.argv[1]])
