"""Keeps TensorFlow's noise from the user of the trainer's commands (no TensorFlow import here).

TensorFlow writes lines to file descriptor 2 from C++, some before its logging honours
``TF_CPP_MIN_LOG_LEVEL`` ("All log messages before absl::InitializeLog() is called are
written to STDERR"), that tell the user nothing: the oneDNN notice and "Could not find cuda
drivers" at import; ``E0000 ... failed call to cuInit`` when a machine without a GPU driver
lists its devices; and, with op determinism, an ``E0000 ... NodeDef mentions attribute
use_unbounded_threadpool`` line when tf.data rewrites a map for determinism (the Python side of
TensorFlow 2.21 writes an attribute its C++ op definition lacks; harmless). ``NOISE`` lists them.

``filter_stderr()``, called first thing by every command (``python -m trainer.train``,
``trainer.tune``, ``trainer.distributed``, ``trainer.report``), points descriptor 2 at a small
child process that copies every line to the real stderr except those. A child process rather
than a thread: whatever the command writes before it dies, even by a C++ abort or SIGKILL, is
still in the pipe, and the child writes it out when it reads the end of the pipe; it ignores
Ctrl-C, so a traceback after Ctrl-C still gets through. Processes the command starts inherit the
filtered descriptor (a PS cluster's servers), and do not start a filter of their own unless their
stderr goes elsewhere. The cuInit error is dropped only after the "no cuda drivers" line, so a
real driver failure still shows.

``quiet_tf_logging()`` drops hints of the ``tensorflow`` logger about choices made on purpose
(``LOG_NOISE``). Other retracing warnings still show: the trainer keeps one prediction function
and one checkpoint saver per model, so it has none.

    python -m trainer.quiet MODULE [ARGS...]     (e.g. export.exporter, from ``make train``)

runs ``python -m MODULE ARGS`` with both.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys

NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\."),
    re.compile(r"^I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"),
    re.compile(r"^E\d{4} [\d:. ]+\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool "
               r"which is not in the op definition"),
)
NO_DRIVER = NOISE[2]
CUINIT_FAILED = re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: ")
# Messages of the ``tensorflow`` logger that are hints about choices made on purpose: the kill-safe
# backup callback is slower than a small batch; a checkpoint of variables on several tasks (the
# parameter servers) is traced anew on every save and restore, by TensorFlow's design
# (tensorflow/python/checkpoint/functional_saver.py); the exporter checks a SavedModel with the
# TF1 loader because that is how TF Serving loads it.
LOG_NOISE = (
    re.compile(r"Callback method `on_\w+` is slow compared to the batch time"),
    re.compile(r"load \(from tensorflow\.python\.saved_model\.loader_impl\) is deprecated"),
    re.compile(r"calls to <function MultiDeviceSaver\.(save|restore)\.<locals>\.tf_function_(save|restore) "
               r"at 0x[0-9a-f]+> triggered tf\.function retracing"),
)
# Set in the environment of a filtered process: "<st_dev>:<st_ino>" of the pipe behind its stderr.
_MARKER = "TRAINER_QUIET_STDERR"


class LineFilter:
    """Says which lines of a stream to keep (stateful: the cuInit error is noise after "no cuda drivers")."""

    def __init__(self):
        self.no_driver = False

    def keep(self, line: str) -> bool:
        if NO_DRIVER.search(line):
            self.no_driver = True
        if any(p.search(line) for p in NOISE):
            return False
        return not (self.no_driver and CUINIT_FAILED.search(line))


def keep_lines(lines: list[str]) -> list[str]:
    """The lines that are not known noise."""
    f = LineFilter()
    return [line for line in lines if f.keep(line)]


def _copy(src, dst) -> None:
    """The child's loop: copies ``src`` to ``dst`` line by line, without the noise, until ``src`` ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the command; we drain its last words
    f = LineFilter()
    for raw in iter(src.readline, b""):
        if f.keep(raw.decode("utf-8", errors="replace")):
            dst.write(raw)
            dst.flush()


def _pipe_id(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


def filter_stderr() -> None:
    """Sends this process's descriptor 2 (and its children's) through the noise filter, once.

    At exit the process waits for the filter to write out what it still holds (so a caller that
    reads a log file after the process ended reads all of it); ``os._exit`` and signals skip that
    wait, and the filter still writes everything, a moment later.
    """
    try:
        if os.environ.get(_MARKER) == _pipe_id(2):
            return  # a parent's filter already reads our stderr
    except OSError:
        return  # no stderr at all
    sys.stderr.flush()
    read, write = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path[:0] = __import__('json').loads(sys.argv[1]); "
                               "from trainer.quiet import _copy; _copy(sys.stdin.buffer, sys.stdout.buffer)",
         json.dumps(sys.path)],
        stdin=read, stdout=2, stderr=subprocess.DEVNULL, close_fds=True)
    os.close(read)
    original = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    os.environ[_MARKER] = _pipe_id(2)
    atexit.register(_drain, child, original)


def _drain(child: subprocess.Popen, original: int) -> None:
    """Gives descriptor 2 back to the real stderr (closing our end of the pipe) and lets the filter finish."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(original, 2)
    try:
        child.wait(timeout=10)  # longer only if a process we started still holds the pipe
    except subprocess.TimeoutExpired:
        pass


class _LogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in LOG_NOISE)


def quiet_tf_logging() -> None:
    """Drops ``LOG_NOISE`` from the ``tensorflow`` logger (imports TensorFlow)."""
    import tensorflow as tf

    logger = tf.get_logger()
    if not any(isinstance(f, _LogFilter) for f in logger.filters):
        logger.addFilter(_LogFilter())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m trainer.quiet MODULE [ARGS...]")
    filter_stderr()
    quiet_tf_logging()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
