"""Which threads a 100-ad request runs on, and who preempts the server's request thread.

    python -m bench.request_threads [--workdir runs/bench/serving] [--model deepfm] [--kind raw]
        [--ads 100] [--calls 2000] [--traced 60] [--out runs/bench/request_threads.json]

Serves the model ``bench.bench_serving`` built in ``--workdir`` with ``bench.timed_server``
(``threads``: the plain server, which writes its Python threads' names on SIGUSR1), next to a bare
grpcio server (``bench_serving``'s gRPC floor). Two measurements:

* **CPU per call, by thread role**: the kernel's run time of every thread of both processes
  (``/proc/<pid>/task/<tid>/schedstat``) over ``--calls`` e2e calls through ``ServingClient``, then
  over as many calls of the same request bytes to the bare grpcio server.
* **Preemptions of the request thread** (where the kernel's tracefs is writable, e.g. as root):
  ``sched_switch`` events with a marker around each of ``--traced`` e2e calls.
  Per call: context switches on both cores, and each time the server's request thread lost its
  core while runnable, to whom, how long until it ran again, and whether the other core was idle.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import sys
import threading
import time

import numpy as np

from bench import bench_serving, timed_server

TRACEFS = "/sys/kernel/tracing"
REQUEST = "server request thread"
IDLE = "idle"
_LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+): (\w+): (.*)$")
_SWITCH = re.compile(r"prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=.* next_pid=(\d+)")


def role_of(side: str, name: str | None, comm: str) -> str:
    """A thread's role from its Python name (None: unknown, e.g. a native thread) and its kernel name."""
    if name is None:
        if comm == "event_engine":
            return f"{side} gRPC event engine"
        if side == "server" and comm == "python":  # every Python thread of the server has a name
            return "server TF intra-op pool (native)"
        return f"{side} other threads ({comm})"
    if side == "server" and name.startswith("grpc_"):
        return REQUEST
    if name.endswith("(_serve)"):
        return f"{side} gRPC poller"
    return f"{side} {name}"


def run_ns(pid: int) -> dict:
    """{tid: (kernel name, run time ns)} of every thread of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f, open(f"/proc/{pid}/task/{tid}/schedstat") as g:
                out[int(tid)] = (f.read().strip(), int(g.read().split()[0]))
        except OSError:  # the thread exited
            pass
    return out


def cpu_per_call(fn, n: int, pids: dict) -> dict:
    """{(side, tid, kernel name): us of CPU per call} over ``n`` calls of ``fn``, for ``pids`` ({pid: side})."""
    before = {pid: run_ns(pid) for pid in pids}
    for _ in range(n):
        fn()
    return {(side, tid, comm): (ns - before[pid].get(tid, (comm, 0))[1]) / n / 1e3
            for pid, side in pids.items() for tid, (comm, ns) in run_ns(pid).items()}


def by_role(per_thread: dict, names: dict) -> dict:
    """``cpu_per_call``'s figures summed by thread role (``names``: {tid: Python thread name})."""
    out = collections.Counter()
    for (side, tid, comm), us in per_thread.items():
        out[role_of(side, names.get(tid), comm)] += us
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def parse_trace(lines) -> list[tuple]:
    """(time s, cpu, "switch" or "mark", fields) of the sched_switch and marker lines of an ftrace text."""
    out = []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        t, cpu, kind, rest = float(m.group(4)), int(m.group(3)), m.group(5), m.group(6)
        if kind == "sched_switch":
            s = _SWITCH.search(rest)
            out.append((t, cpu, "switch", (int(s.group(1)), s.group(2), int(s.group(3)))))
        elif kind == "tracing_mark_write":
            out.append((t, cpu, "mark", rest.strip()))
    return out


def request_stats(events: list[tuple], roles: dict) -> dict:
    """Per traced call (between ``START`` and ``END`` markers): switches, and the request thread's preemptions.

    A preemption is a switch away from the request thread in state R (runnable); it lasts until
    the request thread is switched in again. The other core is idle when its last switch was to
    pid 0.
    """
    name = lambda pid: IDLE if pid == 0 else roles.get(pid, "other")  # noqa: E731
    calls, cur, on_cpu, open_preempt = [], None, {}, None
    by, waits, other_idle = collections.Counter(), collections.defaultdict(list), []
    for t, cpu, kind, f in events:
        if kind == "mark":
            if f.startswith("START"):
                cur = {"switches": 0, "preempted": 0}
            elif f.startswith("END") and cur is not None:
                calls.append(cur)
                cur = None
            continue
        prev, state, nxt = f
        on_cpu[cpu] = nxt
        if cur is not None:
            cur["switches"] += 1
        if name(prev) == REQUEST and state.startswith("R"):
            open_preempt = (t, name(nxt))
            by[name(nxt)] += 1
            other_idle.append(any(c != cpu and p == 0 for c, p in on_cpu.items()))
            if cur is not None:
                cur["preempted"] += 1
        elif name(nxt) == REQUEST and open_preempt is not None:
            waits[open_preempt[1]].append((t - open_preempt[0]) * 1e6)
            open_preempt = None
    n = max(1, len(calls))
    return {"calls": len(calls),
            "switches_per_call": float(np.median([c["switches"] for c in calls])) if calls else float("nan"),
            "preemptions_per_call": sum(c["preempted"] for c in calls) / n,
            "preempted_by": {k: {"per_call": v / n, "wait_us_p50": float(np.median(waits[k])) if waits[k] else None}
                             for k, v in by.most_common()},
            "other_core_idle": float(np.mean(other_idle)) if other_idle else float("nan")}


def trace_calls(fn, n: int) -> list[str] | None:
    """ftrace lines of ``n`` calls of ``fn`` with START/END markers; None where tracefs is not writable
    (as root: ``mount -t tracefs nodev /sys/kernel/tracing``)."""
    def write(name, value):
        with open(os.path.join(TRACEFS, name), "w") as f:
            f.write(value)
    try:
        write("trace", "")
        write("buffer_size_kb", "20000")
        write("set_event", "sched:sched_switch")
    except OSError:
        return None
    try:
        with open(os.path.join(TRACEFS, "trace_marker"), "w", buffering=1) as marker:
            write("tracing_on", "1")
            for i in range(n):
                marker.write(f"START {i}\n")
                fn()
                marker.write(f"END {i}\n")
            write("tracing_on", "0")
        with open(os.path.join(TRACEFS, "trace")) as f:
            return f.read().splitlines()
    finally:
        write("tracing_on", "0")
        write("set_event", "")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_serving.add_request_args(p, "runs/bench/request_threads.json", block=10)
    p.add_argument("--calls", type=int, default=2000, help="calls of each loop of the CPU-per-call figure")
    p.add_argument("--traced", type=int, default=60, help="e2e calls traced with ftrace (0: none)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from serving.client import ServingClient

    path, req = bench_serving.request_of(args)
    config = bench_serving.write_model_config(args.workdir, "request_threads.config", args.model, path)
    records_path = os.path.abspath(args.out + ".records")
    names_path = records_path + ".threads"
    proc, target = timed_server.start(config, os.path.join(args.workdir, "request_threads-server.log"), "threads",
                                      records_path)
    echo_proc, echo_target = bench_serving.start_echo()
    result = {"command": "python -m bench.request_threads " + " ".join(sys.argv[1:] if argv is None else argv),
              "request_bytes": len(req.bytes)}
    try:
        _, echo = bench_serving.echo_call(echo_target)
        with ServingClient(target, args.model, timeout_s=30) as client:
            e2e = lambda: req.call(client)  # noqa: E731
            for _ in range(50):
                e2e()
                echo(req.bytes, timeout=30)
            cpu = {"e2e": cpu_per_call(e2e, args.calls, {proc.pid: "server", os.getpid(): "client"}),
                   "gRPC floor": cpu_per_call(lambda: echo(req.bytes, timeout=30), args.calls,
                                              {echo_proc.pid: "echo server", os.getpid(): "client"})}
            lines = trace_calls(e2e, args.traced) if args.traced else None
        # Thread names last: the server starts a request thread whenever a request finds none idle.
        names = {t.native_id: t.name for t in threading.enumerate()}
        os.kill(proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not os.path.exists(names_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(names_path) as f:
            server_names = {int(k): v for k, v in json.load(f).items()}
        result["cpu_us_per_call"] = {k: by_role(v, {**names, **server_names}) for k, v in cpu.items()}
        roles = {tid: role_of(side, (server_names if side == "server" else names).get(tid), comm)
                 for (side, tid, comm) in cpu["e2e"]}
        result["preemptions"] = (request_stats(parse_trace(lines), roles) if lines else
                                 f"{TRACEFS} is not writable here (root, mounted tracefs)")
    finally:
        bench_serving.stop_children([proc], echo_proc)
        for leftover in (records_path, names_path):
            if os.path.exists(leftover):
                os.remove(leftover)
    print_result(args, result)
    bench_serving.write_json(args.out, result, "request_threads")


def print_result(args, r: dict) -> None:
    print(f"{args.model} {args.kind}, {args.ads} ads ({r['request_bytes']} bytes)\n")
    print("| thread role | e2e: CPU us per call | gRPC floor: CPU us per call |")
    print("|---|---:|---:|")
    e2e, floor = r["cpu_us_per_call"]["e2e"], r["cpu_us_per_call"]["gRPC floor"]
    for role in list(e2e) + [k for k in floor if k not in e2e]:
        print(f"| {role} | {e2e.get(role, '')} | {floor.get(role, '')} |")
    s = r["preemptions"]
    if isinstance(s, str):
        print(f"\npreemptions: {s}")
        return
    print(f"\n{s['calls']} traced e2e calls: {s['switches_per_call']:.0f} context switches per call (p50); the "
          f"request thread lost its core {s['preemptions_per_call']:.2f} times per call, the other core idle in "
          f"{s['other_core_idle']:.0%} of them:\n")
    print("| to | per call | wait until it ran again, p50 us |")
    print("|---|---:|---:|")
    for role, v in s["preempted_by"].items():
        wait = "" if v["wait_us_p50"] is None else f"{v['wait_us_p50']:.0f}"
        print(f"| {role} | {v['per_call']:.2f} | {wait} |")
    print()


if __name__ == "__main__":
    main()
