"""Reliability: a poller never sees a partial export version."""
from __future__ import annotations

import os
import threading

from export import exporter

REQUIRED = ("saved_model.pb", os.path.join("variables", "variables.index"),
            os.path.join("assets.extra", "schema.json"), os.path.join("assets.extra", "tf_serving_warmup_requests"))


def test_poller_never_sees_an_incomplete_version(served_export, tmp_path):
    base = str(tmp_path / "export")
    model_dir = os.path.join(base, "ctr")
    os.makedirs(model_dir)
    stop = threading.Event()
    seen, incomplete, polls = set(), [], [0]

    def poll():
        # What TF Serving's file-system source does: list the numeric children of the model dir.
        while not stop.is_set():
            polls[0] += 1
            for name in os.listdir(model_dir):
                if not name.isdigit():
                    continue
                path = os.path.join(model_dir, name)
                missing = [r for r in REQUIRED if not os.path.exists(os.path.join(path, r))]
                if missing and os.path.exists(path):  # still there (not deleted) yet incomplete
                    incomplete.append((name, missing))
                seen.add(name)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    published = []
    try:
        for _ in range(3):
            path, check = exporter.export(served_export["runs"]["lr"], base, "ctr", verify_examples=500)
            published.append(os.path.basename(path))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert incomplete == []
    assert polls[0] > 100
    assert set(published) <= seen | set(os.listdir(model_dir))
    assert sorted(d for d in os.listdir(model_dir) if d.isdigit()) == sorted(published)
