"""Model sync: copy only a changed version, verify the copy, keep a backup, retry, never show a partial version.

Versions here are small directories with a checksum manifest (sync copies files; what they hold
does not matter to it); tests/test_serving.py runs sync against a live server with real SavedModels.
"""
from __future__ import annotations

import os
import shutil

import pytest

from serving import manifest, sync


def make_version(root: str, version: int, payload: str) -> str:
    path = os.path.join(root, str(version))
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
        f.write(f"graph {payload}")
    with open(os.path.join(path, "variables", "variables.data-00000-of-00001"), "w") as f:
        f.write(payload * 1000)
    manifest.write(path)
    return path


def listing(model_dir: str) -> list[str]:
    return sorted(os.listdir(model_dir))


def no_sleep(_):
    pass


def test_unchanged_manifest_copies_nothing(tmp_path):
    src, dest = str(tmp_path / "export" / "m"), str(tmp_path / "serving" / "m")
    make_version(src, 1, "a")
    first = sync.push(src, dest)
    assert (first.action, first.version, first.attempts) == ("copied", 1, 1)
    manifest.verify(first.path)
    stamp = os.stat(os.path.join(first.path, "saved_model.pb")).st_mtime_ns
    again = sync.push(src, dest, copy_function=lambda *a: pytest.fail("copied an unchanged version"))
    assert (again.action, again.version, again.attempts) == ("unchanged", 1, 0)
    assert listing(dest) == ["1"]
    assert os.stat(os.path.join(first.path, "saved_model.pb")).st_mtime_ns == stamp
    # Same content under a newer source version number: still unchanged.
    shutil.copytree(os.path.join(src, "1"), os.path.join(src, "5"))
    assert sync.push(src, dest).action == "unchanged" and listing(dest) == ["1"]


def test_changed_version_is_published_and_the_previous_kept_as_backup(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(src, 1, "a")
    sync.push(src, dest)
    make_version(src, 2, "b")
    res = sync.push(src, dest)
    assert (res.action, res.version, res.removed) == ("copied", 2, ())
    assert listing(dest) == ["1", "2"]  # 1 stays as the backup
    make_version(src, 3, "c")
    res = sync.push(src, dest)
    assert (res.version, res.removed) == (3, (1,))
    assert listing(dest) == ["2", "3"]
    with open(os.path.join(dest, "3", "variables", "variables.data-00000-of-00001")) as f:
        assert f.read() == "c" * 1000
    assert sync.rollback(dest) == 2
    assert listing(dest) == ["2"]
    with pytest.raises(sync.SyncError, match="no backup"):
        sync.rollback(dest)


def test_a_source_version_not_newer_than_live_is_published_above_it(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(dest, 7, "live")
    res = sync.push(make_version(src, 3, "new"), dest)  # a version directory as the source
    assert res.version == 8 and listing(dest) == ["7", "8"]
    assert manifest.read(os.path.join(dest, "8")) == manifest.read(os.path.join(src, "3"))


def test_a_corrupted_copy_is_detected_and_retried(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(src, 1, "a")
    calls = {"n": 0}

    def flaky_copy(s, d):
        shutil.copy2(s, d)
        if s.endswith("variables.data-00000-of-00001") and calls["n"] == 0:
            calls["n"] += 1
            with open(d, "r+b") as f:  # one flipped byte, as a bad disk or network would
                f.seek(10)
                f.write(b"X")
    res = sync.push(src, dest, copy_function=flaky_copy, sleep=no_sleep)
    assert (res.action, res.attempts) == ("copied", 2) and calls["n"] == 1
    manifest.verify(res.path)
    assert listing(dest) == ["1"]


def test_a_copy_that_never_verifies_publishes_nothing(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(src, 1, "a")
    sync.push(src, dest)
    make_version(src, 2, "b")
    waits = []

    def truncating_copy(s, d):
        shutil.copy2(s, d)
        if s.endswith("saved_model.pb"):
            with open(d, "r+b") as f:
                f.truncate(3)
    with pytest.raises(sync.SyncError, match="after 4 attempts.*differing.*saved_model.pb"):
        sync.push(src, dest, retries=3, retry_wait_s=0.5, copy_function=truncating_copy, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0]  # exponential backoff
    assert listing(dest) == ["1"]  # no version 2, no temporary directory left behind


def test_transient_io_errors_are_retried(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(src, 4, "a")
    fails = {"left": 2}

    def flaky(s, d):
        if fails["left"] and s.endswith("saved_model.pb"):  # fails the first two attempts
            fails["left"] -= 1
            raise OSError(5, "Input/output error")
        shutil.copy2(s, d)
    res = sync.push(src, dest, copy_function=flaky, sleep=no_sleep)
    assert (res.version, res.attempts) == (4, 3)
    manifest.verify(res.path)


def test_a_corrupt_source_is_rejected_before_copying(tmp_path):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    path = make_version(src, 1, "a")
    with open(os.path.join(path, "saved_model.pb"), "a") as f:
        f.write("tampered")
    with pytest.raises(sync.SyncError, match="source"):
        sync.push(src, dest, retries=1, sleep=no_sleep)
    assert not os.path.exists(dest) or listing(dest) == []


def test_cli_push(tmp_path, capsys):
    src, dest = str(tmp_path / "export"), str(tmp_path / "serving")
    make_version(src, 2, "a")
    sync.main(["push", "--source", src, "--dest", dest])
    assert capsys.readouterr().out.strip() == f"sync: copied version 2 at {os.path.join(dest, '2')}"
    sync.main(["push", "--source", src, "--dest", dest])
    assert capsys.readouterr().out.startswith("sync: unchanged version 2")
    with pytest.raises(SystemExit):
        sync.main(["rollback", "--dest", dest])
