"""serving.executor.HotThreadExecutor: the last idle thread runs the next task; bounds, errors, shutdown."""
import threading
import time

import pytest

from serving.executor import HotThreadExecutor


def _wait_idle(ex, n):
    """Until ``n`` threads are back on the idle stack (a thread re-registers just after its future resolves)."""
    deadline = time.monotonic() + 5
    while len(ex._idle) != n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_sequential_tasks_run_on_the_thread_that_went_idle_last():
    ex = HotThreadExecutor(4, thread_name_prefix="t")
    gate = threading.Barrier(3)
    # Three tasks at once start three threads.
    started = [ex.submit(lambda: (gate.wait(5), threading.current_thread().name)[1]) for _ in range(3)]
    names = {f.result(5) for f in started}
    assert names == {"t_0", "t_1", "t_2"}
    # One at a time, every task runs on the same thread: the one that went idle last.
    seq = []
    for _ in range(20):
        _wait_idle(ex, 3)
        seq.append(ex.submit(lambda: threading.current_thread().name).result(5))
    assert len(set(seq)) == 1 and seq[0] in names
    ex.shutdown()


def test_tasks_beyond_max_workers_wait_and_run_in_order():
    ex = HotThreadExecutor(2)
    release = threading.Event()
    running = threading.Semaphore(0)
    order = []

    def blocker(i):
        running.release()
        release.wait(5)
        order.append(i)

    blocked = [ex.submit(blocker, i) for i in range(2)]
    assert running.acquire(timeout=5) and running.acquire(timeout=5)
    queued = [ex.submit(order.append, i) for i in (10, 11, 12)]
    assert not any(f.done() for f in queued)  # both threads are busy: nothing else runs
    assert len(ex._threads) == 2
    release.set()
    for f in blocked + queued:
        f.result(5)
    assert [i for i in order if i >= 10] == [10, 11, 12]  # FIFO among the waiting tasks
    ex.shutdown()


def test_results_exceptions_initializer_and_shutdown():
    seen = []
    ex = HotThreadExecutor(2, initializer=seen.append, initargs=("init",))
    assert ex.submit(lambda a, b=0: a * 10 + b, 4, b=2).result(5) == 42
    _wait_idle(ex, 1)
    with pytest.raises(ZeroDivisionError):
        ex.submit(lambda: 1 / 0).result(5)
    assert seen == ["init"]  # the one thread ran both tasks and its initializer once
    threads = list(ex._threads)
    ex.shutdown(wait=True)
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(print)
    with pytest.raises(ValueError):
        HotThreadExecutor(0)
