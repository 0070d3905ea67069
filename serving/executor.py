"""The request threads of the gRPC server: each request runs on the thread that went idle last.

``concurrent.futures.ThreadPoolExecutor`` hands a task to whichever idle thread the queue's lock
wakes, which is the one idle the longest: at a steady request rate below the pool size every
request runs on a different thread, whose stack, malloc arena and TensorFlow thread-local buffers
went cold since its last request. Here an idle thread is a stack (last in, first out), so a
sequence of requests keeps running on one warm thread and the others only take the overflow.
"""
from __future__ import annotations

import collections
import threading
from concurrent import futures


class _Worker:
    __slots__ = ("wake", "task")

    def __init__(self):
        self.wake = threading.Event()
        self.task = None


class HotThreadExecutor(futures.Executor):
    """An executor of up to ``max_workers`` threads that gives each task to the most recently idle thread.

    Args:
      max_workers: threads at most; started on demand (a task with no idle thread starts one until
        there are ``max_workers``; beyond that tasks wait in FIFO order).
      thread_name_prefix: names the threads ``<prefix>_<n>``.
      initializer: called with ``initargs`` in every thread before its first task.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "hot", initializer=None, initargs=()):
        if max_workers <= 0:
            raise ValueError(f"max_workers must be > 0, got {max_workers}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._initializer, self._initargs = initializer, initargs
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # a stack: the last thread to go idle is the next to run
        self._waiting: collections.deque = collections.deque()  # tasks that found no thread
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        future = futures.Future()
        task = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                worker = self._idle.pop()
                worker.task = task
                worker.wake.set()
            elif len(self._threads) < self._max_workers:
                t = threading.Thread(target=self._work, args=(_Worker(), task), daemon=True,
                                     name=f"{self._prefix}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._waiting.append(task)
        return future

    def _work(self, worker: _Worker, task) -> None:
        if self._initializer is not None:
            self._initializer(*self._initargs)
        while task is not None:
            _run(task)
            with self._lock:
                if self._waiting:
                    task = self._waiting.popleft()
                    continue
                if self._shutdown:
                    return
                worker.task = None
                worker.wake.clear()
                self._idle.append(worker)
            worker.wake.wait()
            task = worker.task

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._waiting:
                    self._waiting.popleft()[0].cancel()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for worker in idle:  # task None: the thread exits
            worker.wake.set()
        if wait:
            for t in threads:
                t.join()


def _run(task) -> None:
    future, fn, args, kwargs = task
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 (handed to the future, as ThreadPoolExecutor does)
        future.set_exception(e)
    else:
        future.set_result(result)
