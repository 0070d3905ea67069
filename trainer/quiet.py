"""Keeps TensorFlow's start-up noise from the user (this module does not import TensorFlow itself).

TensorFlow writes a few lines to file descriptor 2 from C++ before its logging honours
``TF_CPP_MIN_LOG_LEVEL`` ("All log messages before absl::InitializeLog() is called are
written to STDERR"): the oneDNN notice and "Could not find cuda drivers" at import, and, on a
machine without a GPU driver, ``E0000 ... failed call to cuInit`` when the devices are first
listed. ``import_tensorflow()`` imports TensorFlow and lists the devices with descriptor 2 sent
to a temporary file, then writes back every line that is not one of those (the cuInit error is
dropped only next to the "no cuda drivers" line, so a real driver failure still shows). It also
drops hints from the ``tensorflow`` logger that are about choices made on purpose (``LOG_NOISE``):
Keras' "Callback method ... is slow compared to the batch time", the retracing warning of
checkpoints that span the parameter servers and the deprecation of the TF1 SavedModel loader
the exporter uses to load a model the way TF Serving does. Other retracing warnings still show: the trainer
keeps one prediction function and one checkpoint saver per model so that it has none.

Entry points call ``import_tensorflow()`` before anything imports TensorFlow; a module run
through

    python -m trainer.quiet MODULE [ARGS...]      (e.g. export.exporter, from ``make train``)

gets the same treatment. A hard crash (a C++ abort) during the import would lose what was
captured; Python errors are replayed before they propagate.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import runpy
import sys
import tempfile

# Lines TensorFlow prints at import and device listing that carry nothing for the user.
NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\s*$"),
    re.compile(r"^I\d{4} [\d:. ]+\d+ port\.cc:\d+\] oneDNN custom operations are on\."),
    re.compile(r"^I\d{4} [\d:. ]+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"),
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


def keep_lines(lines: list[str]) -> list[str]:
    """The captured lines that are not known start-up noise."""
    no_driver = any(NO_DRIVER.search(line) for line in lines)
    return [line for line in lines
            if not any(p.search(line) for p in NOISE) and not (no_driver and CUINIT_FAILED.search(line))]


@contextlib.contextmanager
def filtered_stderr():
    """Sends descriptor 2 to a temporary file for the block, then replays the lines ``keep_lines`` keeps."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", errors="replace")
            kept = keep_lines(text.splitlines(keepends=True))
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _LogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in LOG_NOISE)


def import_tensorflow():
    """Imports TensorFlow and initialises its devices with the start-up noise filtered; returns ``tf``."""
    with filtered_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()  # where a machine without a GPU driver logs cuInit's failure
    logger = tf.get_logger()
    if not any(isinstance(f, _LogFilter) for f in logger.filters):
        logger.addFilter(_LogFilter())
    return tf


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m trainer.quiet MODULE [ARGS...]")
    import_tensorflow()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
