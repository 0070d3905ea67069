"""Statistics of the serving benches: bench_serving.p99_interval (hand-computed ranks), the 100-ad
bar's pooled ratio (bench_serving.p50_ratio, bars), swap_phases.step_table (requests placed on the
server's load steps by hand), request_split.split and request_threads' preemption count (a
hand-written scheduler trace); bench_serving.no_gc_pauses."""
import gc

import numpy as np

from bench.bench_serving import HOST_QUIET, bars, host_slowdown, no_gc_pauses, p50_ratio, p99_interval
from bench.request_split import split
from bench.request_threads import REQUEST, parse_trace, request_stats, role_of
from bench.swap_phases import step_table


def test_p99_interval_ranks():
    # n = 2000: rank 0.99 n = 1980 -/+ 1.96 sqrt(2000 x 0.99 x 0.01) = 8.72 -> ranks 1971 and 1989.
    assert p99_interval(np.arange(1, 2001) / 1e3) == (1971.0, 1989.0)
    # n = 277: 274.23 -/+ 3.26 -> ranks 270 and 278, clipped to the slowest (277).
    assert p99_interval(np.arange(1, 278) / 1e3) == (270.0, 277.0)
    lo, hi = p99_interval([])
    assert np.isnan(lo) and np.isnan(hi)


def test_step_table_places_requests_on_load_steps():
    # 100 requests of 2 ms before the swap (its p99: 2 ms); during the swap window [10, 11] s one of
    # 5 ms inside the restore, one of 1 ms inside the warm-up, one of 3 ms in no step.
    requests = [(i * 0.01, 0.002) for i in range(100)] + [(10.1, 0.005), (10.3, 0.001), (10.6, 0.003)]
    records = [{"step": "graph import", "start": 5.0, "end": 5.1, "cpu_s": 0.05},  # the start-up load: not a swap
               {"step": "variable restore", "start": 10.05, "end": 10.2, "cpu_s": 0.02},
               {"step": "warm-up", "start": 10.25, "end": 10.5, "cpu_s": 0.1}]
    t = step_table(records, requests, [(10.0, 11.0)])
    assert (t["steady_p99_ms"], t["requests_outside"], t["requests_during"], t["slow_during"]) == (2.0, 100, 3, 2)
    restore, warmup, graph = t["steps"]["variable restore"], t["steps"]["warm-up"], t["steps"]["graph import"]
    assert (restore["swaps"], restore["requests"], restore["slow"]) == (1, 1, 1)
    assert np.allclose([restore["wall_ms"], restore["cpu_ms"], restore["p50_ms"]], [150, 20, 5])
    assert (warmup["requests"], warmup["slow"]) == (1, 0) and np.isclose(warmup["p50_ms"], 1)
    assert (graph["swaps"], graph["requests"], graph["p50_ms"]) == (0, 0, None)


def test_request_split_takes_the_servers_calls_of_the_timed_block():
    # 10 timed e2e calls of 2 ms; the server's last 10 handler calls took 1.6 ms (the 2 before them,
    # untimed warm-up calls, 5 ms) with a Session call of 1.2 ms inside; floor 1 ms, gRPC floor 0.5 ms.
    times = {"floor": [0.001] * 10, "grpc floor": [0.0005] * 10, "e2e": [0.002] * 10}
    # The Session calls used 1.1 ms of thread CPU (the warm-up ones 4 ms); the floor loop 0.9 ms.
    records = ([{"step": "handler", "start": 0.0, "end": 0.005, "cpu_s": 0.005}] * 2
               + [{"step": "handler", "start": 1.0, "end": 1.0016, "cpu_s": 0.0015}] * 10
               + [{"step": "session run", "start": 0.0, "end": 0.005, "cpu_s": 0.004}] * 2
               + [{"step": "session run", "start": 1.0, "end": 1.0012, "cpu_s": 0.0011}] * 10)
    r = split(times, records, {"floor cpu": [0.0009] * 10})
    assert np.allclose([r["handler"], r["session run"], r["e2e_over_floors"], r["session_run_over_floor_ms"],
                        r["handler_python_ms"], r["rest_over_grpc_floor_ms"], r["session run cpu"], r["floor cpu"]],
                       [1.6, 1.2, 2.0 / 1.5, 0.2, 0.4, -0.1, 1.1, 0.9])


def test_bar_ratio_is_taken_over_the_pooled_calls_of_every_server():
    # Server A: e2e 2.0 ms, floor 1.0, gRPC floor 0.5 (ratio 1.333); server B: e2e 1.7, same floors
    # (1.133). Pooled, the e2e calls are 5 x 2.0 and 6 x 1.7 ms: p50 1.7 ms, ratio 1.7 / 1.5 = 1.133,
    # not the mean of the two ratios (1.233).
    a = {"floor": [0.001] * 5, "grpc": [0.0005] * 5, "e2e": [0.002] * 5}
    b = {"floor": [0.001] * 6, "grpc": [0.0005] * 6, "e2e": [0.0017] * 6}
    assert np.isclose(p50_ratio(a)["e2e_over_floors"], 2.0 / 1.5)
    pooled = p50_ratio({k: a[k] + b[k] for k in a})
    assert pooled["calls"] == 11 and np.isclose(pooled["e2e_over_floors"], 1.7 / 1.5)
    # bars() judges the pooled ratio, not the table's row of the same size.
    row = {"e2e_over_floors": 1.4, "request_bytes": 100}
    results = {"transport": {"p50_ms": 0.3}, "models": {"m": {
        "kinds": {"raw": {100: row}, "rank": {100: {**row, "request_bytes": 40}}},
        "bar_100_ads": {"ads": 100, "servers": [{"raw": p50_ratio(a)}, {"raw": p50_ratio(b)}], "pooled": {"raw": pooled},
                        "host_slowdown": 1.04,
                        # best loop ms per core: 8.0 / 5.0 = 1.6 apart at the start, 5.5 / 5.0 = 1.1 at the end
                        "host_speed": {"start": {"cpu0": {"best_ms": 5.0}, "cpu1": {"best_ms": 8.0}},
                                       "end": {"cpu0": {"best_ms": 5.0}, "cpu1": {"best_ms": 5.5}}}},
        "swap": {"p99_ms_during_swap": 3.0, "p99_ms_without_swap": 2.0, "failed_requests": 0, "swaps": 1},
        "swap_kind": "raw"}}}
    b = bars(results)["m"]
    assert np.isclose(b["100_ads_raw_e2e_over_floors"]["value"], 1.7 / 1.5) and b["100_ads_raw_e2e_over_floors"]["ok"]
    assert "2 fresh servers" in b["100_ads_raw_e2e_over_floors"]["row"]
    assert b["100_ads_raw_e2e_over_floors"]["host_quiet"] and b["100_ads_raw_e2e_over_floors"]["host_slowdown"] == 1.04
    spread = b["100_ads_raw_e2e_over_floors"]["core_spread"]
    assert spread.keys() == {"start", "end"} and np.isclose(spread["start"], 1.6) and np.isclose(spread["end"], 1.1)
    # rank has no pooled figure here: its bar falls back to the table's row, 1.4, over the bar of 1.25.
    rank = b["100_ads_rank_e2e_over_floors"]
    assert (rank["value"], rank["bar"], rank["ok"]) == (1.4, 1.25, False)
    assert "the table's server" in rank["row"] and "host_quiet" not in rank


def test_host_slowdown_is_the_median_check_over_the_fastest():
    # 7 calls of the fixed loop: fastest 1.4 ms, median 1.5 ms -> 1.071 (quiet); a host that slowed the
    # cores for 4 of the 7 calls (2.1 ms) -> median 2.1 / 1.4 = 1.5 (contended).
    quiet = [0.0014, 0.0015, 0.0014, 0.0016, 0.0015, 0.0017, 0.0015]
    assert np.isclose(host_slowdown(quiet), 1.5 / 1.4) and host_slowdown(quiet) <= HOST_QUIET
    contended = [0.0014, 0.0021, 0.0021, 0.0015, 0.0021, 0.0016, 0.0021]
    assert np.isclose(host_slowdown(contended), 1.5) and host_slowdown(contended) > HOST_QUIET


def test_thread_roles():
    assert role_of("server", "grpc_3", "python") == REQUEST
    assert role_of("server", "Thread-1 (_serve)", "python") == "server gRPC poller"
    assert role_of("server", None, "event_engine") == "server gRPC event engine"
    assert role_of("server", None, "python") == "server TF intra-op pool (native)"
    assert role_of("client", None, "python") == "client other threads (python)"
    assert role_of("client", "MainThread", "python") == "client MainThread"


TRACE = """\
# tracer: nop
          python-100   [000] ..... 10.000000: tracing_mark_write: START 0
          <idle>-0     [001] d..2. 10.000010: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python next_pid=12 next_prio=120
          python-11    [000] d..2. 10.000020: sched_switch: prev_comm=python prev_pid=11 prev_prio=120 prev_state=R+ ==> next_comm=python next_pid=13 next_prio=120
          python-13    [000] d..2. 10.000037: sched_switch: prev_comm=python prev_pid=13 prev_prio=120 prev_state=S ==> next_comm=python next_pid=11 next_prio=120
          python-12    [001] d..2. 10.000040: sched_switch: prev_comm=python prev_pid=12 prev_prio=120 prev_state=S ==> next_comm=swapper/1 next_pid=0 next_prio=120
          python-11    [000] d..2. 10.000050: sched_switch: prev_comm=python prev_pid=11 prev_prio=120 prev_state=R ==> next_comm=python next_pid=12 next_prio=120
          python-12    [000] d..2. 10.000058: sched_switch: prev_comm=python prev_pid=12 prev_prio=120 prev_state=S ==> next_comm=python next_pid=11 next_prio=120
          python-100   [001] ..... 10.000100: tracing_mark_write: END 0
          python-100   [001] ..... 10.001000: tracing_mark_write: START 1
          python-11    [000] d..2. 10.001010: sched_switch: prev_comm=python prev_pid=11 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
          python-100   [001] ..... 10.001020: tracing_mark_write: END 1
"""


def test_request_thread_preemptions_from_a_scheduler_trace():
    # Call 0: the request thread (11) loses core 0 to the intra-op thread (13) for 17 us while core 1
    # runs the poller (12), then to the poller for 8 us while core 1 is idle; 6 switches. Call 1:
    # the request thread sleeps (state S: not a preemption); 1 switch.
    roles = {11: REQUEST, 12: "server gRPC poller", 13: "server TF intra-op pool (native)"}
    events = parse_trace(TRACE.splitlines())
    assert len(events) == 11 and events[2] == (10.00002, 0, "switch", (11, "R+", 13))
    s = request_stats(events, roles)
    assert (s["calls"], s["switches_per_call"], s["preemptions_per_call"]) == (2, 3.5, 1.0)
    pool, poller = s["preempted_by"]["server TF intra-op pool (native)"], s["preempted_by"]["server gRPC poller"]
    assert pool["per_call"] == poller["per_call"] == 0.5
    assert np.isclose(pool["wait_us_p50"], 17) and np.isclose(poller["wait_us_p50"], 8)
    assert s["other_core_idle"] == 0.5


def test_no_gc_pauses_freezes_then_restores_the_collector():
    class Cycle:
        pass

    before = Cycle()
    before.me = before  # a cycle alive before the block: frozen, so a collection would not walk it
    assert gc.isenabled()
    with no_gc_pauses():
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
        assert not any(o is before for o in gc.get_objects())  # frozen objects are no generation's
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert any(o is before for o in gc.get_objects())
