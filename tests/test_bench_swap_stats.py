"""Statistics of the serving benches: bench_serving.p99_interval (hand-computed ranks), the 100-ad
bar's pooled ratio (bench_serving.p50_ratio, bars), swap_phases.step_table (requests placed on the
server's load steps by hand) and request_split.split."""
import numpy as np

from bench.bench_serving import BAR_100, HOST_QUIET, bars, host_slowdown, p50_ratio, p99_interval
from bench.request_split import split
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
    records = ([{"step": "handler", "start": 0.0, "end": 0.005}] * 2
               + [{"step": "handler", "start": 1.0, "end": 1.0016}] * 10
               + [{"step": "session run", "start": 0.0, "end": 0.005}] * 2
               + [{"step": "session run", "start": 1.0, "end": 1.0012}] * 10)
    r = split(times, records)
    assert np.allclose([r["handler"], r["session run"], r["e2e_over_floors"], r["session_run_over_floor_ms"],
                        r["handler_python_ms"], r["rest_over_grpc_floor_ms"]], [1.6, 1.2, 2.0 / 1.5, 0.2, 0.4, -0.1])


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
        "bar_100_ads": {"servers": [{"raw": p50_ratio(a)}, {"raw": p50_ratio(b)}], "pooled": {"raw": pooled},
                        "host_slowdown": 1.04},
        "swap": {"p99_ms_during_swap": 3.0, "p99_ms_without_swap": 2.0, "failed_requests": 0, "swaps": 1},
        "swap_kind": "raw"}}}
    b = bars(results)["m"]
    assert np.isclose(b["100_ads_raw_e2e_over_floors"]["value"], 1.7 / 1.5) and b["100_ads_raw_e2e_over_floors"]["ok"]
    assert "2 fresh servers" in b["100_ads_raw_e2e_over_floors"]["row"]
    assert b["100_ads_raw_e2e_over_floors"]["host_quiet"] and b["100_ads_raw_e2e_over_floors"]["host_slowdown"] == 1.04
    # rank has no pooled figure here: its bar falls back to the table's row (1.4 > BAR_100).
    assert b["100_ads_rank_e2e_over_floors"]["value"] == 1.4 and not b["100_ads_rank_e2e_over_floors"]["ok"]
    assert 1.4 > BAR_100 and "the table's server" in b["100_ads_rank_e2e_over_floors"]["row"]


def test_host_slowdown_is_the_median_check_over_the_fastest():
    # 7 calls of the fixed loop: fastest 1.4 ms, median 1.5 ms -> 1.071 (quiet); a host that slowed the
    # cores for 4 of the 7 calls (2.1 ms) -> median 2.1 / 1.4 = 1.5 (contended).
    quiet = [0.0014, 0.0015, 0.0014, 0.0016, 0.0015, 0.0017, 0.0015]
    assert np.isclose(host_slowdown(quiet), 1.5 / 1.4) and host_slowdown(quiet) <= HOST_QUIET
    contended = [0.0014, 0.0021, 0.0021, 0.0015, 0.0021, 0.0016, 0.0021]
    assert np.isclose(host_slowdown(contended), 1.5) and host_slowdown(contended) > HOST_QUIET
