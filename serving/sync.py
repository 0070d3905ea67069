"""Model sync: publish an exported version into a serving base path, safely.

    python -m serving.sync push --source runs/export/fm --dest /srv/models/fm [--keep 2] [--retries 3]
    python -m serving.sync rollback --dest /srv/models/fm

``push`` takes the newest version of ``--source`` (a model directory of
integer versions, or one version directory) and:

1. verifies the source against its checksum manifest (``serving.manifest``);
2. compares that manifest with the live version's (the newest in ``--dest``):
   equal means the model is already live and nothing is copied;
3. copies it into a hidden temporary directory of ``--dest``
   (``.sync-<version>-<pid>``, which no TF Serving poller takes for a version),
   verifies every file of the copy against the manifest, and renames it to
   ``<version>``: pollers see the whole verified version or nothing. The version
   number is the source's, or the live one + 1 when the source's is not newer,
   so the new version is always the one a ``latest`` policy serves;
4. keeps the previous version as a backup (``--keep 2``: the new one and the
   one before) and removes older ones, each renamed to a hidden name first so
   no poller sees a half-deleted version.

Transient failures (``OSError``, a copy that does not match its checksums) are
retried ``--retries`` times with exponential backoff, each attempt from a fresh
temporary directory. ``rollback`` removes the newest version so the backup
becomes the latest again (a poller with a ``latest`` policy swaps back to it);
roll the source back too, or the next push will publish the same model again.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time

from serving import manifest

log = logging.getLogger("serving.sync")


class SyncError(RuntimeError):
    """The push failed after its retries; nothing was published."""


@dataclasses.dataclass(frozen=True)
class SyncResult:
    """What a push did.

    Attributes:
      action: ``copied`` or ``unchanged``.
      version: the published version (``copied``) or the live one (``unchanged``).
      path: its directory.
      attempts: copy attempts made (0 when unchanged).
      removed: old versions removed after the copy.
    """

    action: str
    version: int
    path: str
    attempts: int = 0
    removed: tuple[int, ...] = ()


def versions(model_dir: str) -> list[int]:
    """Integer versions in ``model_dir``, ascending (hidden temporary directories are not versions)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit() and os.path.isdir(os.path.join(model_dir, d)))


def resolve_source(source: str) -> tuple[int, str]:
    """(version, directory) of the newest version of a model directory, or of a version directory."""
    source = os.path.abspath(source)
    if os.path.exists(os.path.join(source, "saved_model.pb")):
        name = os.path.basename(source)
        if not name.isdigit():
            raise SyncError(f"source version directory {source} is not named by an integer version")
        return int(name), source
    found = versions(source)
    if not found:
        raise SyncError(f"no versions in {source}")
    return found[-1], os.path.join(source, str(found[-1]))


def _remove_hidden(model_dir: str, version: int, tag: str) -> None:
    """Removes a version directory; renamed to a hidden name first so pollers never see it half-deleted."""
    hidden = os.path.join(model_dir, f".sync-{tag}-{version}-{os.getpid()}-{time.time_ns()}")
    os.rename(os.path.join(model_dir, str(version)), hidden)
    shutil.rmtree(hidden)


def push(source: str, dest: str, keep: int = 2, retries: int = 3, retry_wait_s: float = 1.0,
         copy_function=shutil.copy2, sleep=time.sleep) -> SyncResult:
    """Publishes the newest source version into ``dest`` if it differs from the live one.

    Args:
      source: model directory of versions, or one version directory (with a checksum manifest).
      dest: the serving model directory (``<base_path>/<model name>``).
      keep: versions kept in ``dest`` after the copy (2: the new one and its backup).
      retries: extra attempts after a transient failure.
      retry_wait_s: wait before the first retry, doubled for each next one.
      copy_function: copies one file (``shutil.copy2``); tests inject failures here.
      sleep: waits between retries.

    Raises:
      SyncError: every attempt failed; ``dest`` shows no new version and no temporary directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    src_version, src_dir = resolve_source(source)
    expected = _with_retries(lambda: _read_verified(src_dir), retries, retry_wait_s, sleep, f"source {src_dir}")[0]
    os.makedirs(dest, exist_ok=True)
    live = versions(dest)
    if live:
        live_dir = os.path.join(dest, str(live[-1]))
        try:
            live_manifest = manifest.read(live_dir)
        except (OSError, manifest.ChecksumError):
            live_manifest = None  # no readable manifest: treat as different
        if live_manifest == expected:
            log.info("sync: %s equals live version %d of %s: nothing to copy", src_dir, live[-1], dest)
            return SyncResult("unchanged", live[-1], live_dir)
    target = src_version if not live or src_version > live[-1] else live[-1] + 1
    final = os.path.join(dest, str(target))

    def attempt():
        tmp = os.path.join(dest, f".sync-{target}-{os.getpid()}-{time.time_ns()}")
        try:
            shutil.copytree(src_dir, tmp, copy_function=copy_function)
            manifest.verify(tmp, expected)
            if os.path.exists(final):
                raise SyncError(f"{final} appeared during the copy")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    _, attempts = _with_retries(attempt, retries, retry_wait_s, sleep, f"copy of {src_dir} to {final}")
    removed = []
    for v in versions(dest)[:-keep]:
        _remove_hidden(dest, v, "old")
        removed.append(v)
    log.info("sync: published %s as %s in %d attempt(s); removed old versions %s", src_dir, final, attempts, removed)
    return SyncResult("copied", target, final, attempts, tuple(removed))


def _read_verified(version_dir: str) -> dict[str, str]:
    expected = manifest.read(version_dir)
    manifest.verify(version_dir, expected)
    return expected


def _with_retries(fn, retries: int, wait_s: float, sleep, what: str):
    """(fn(), attempts) retrying OSError and ChecksumError; SyncError after the last attempt."""
    for attempt in range(retries + 1):
        try:
            return fn(), attempt + 1
        except (OSError, manifest.ChecksumError) as e:
            if attempt == retries:
                raise SyncError(f"{what} failed after {attempt + 1} attempts: {e}") from e
            log.warning("sync: %s failed (attempt %d of %d): %s", what, attempt + 1, retries + 1, e)
            sleep(wait_s * (2 ** attempt))
    raise AssertionError("unreachable")


def rollback(dest: str) -> int:
    """Removes the newest version of ``dest``; returns the version that is now the newest (the backup)."""
    found = versions(dest)
    if len(found) < 2:
        raise SyncError(f"{dest} has {len(found)} version(s): no backup to roll back to")
    _remove_hidden(dest, found[-1], "rollback")
    log.info("sync: removed version %d of %s; version %d is the newest", found[-1], dest, found[-2])
    return found[-2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Publish exported versions into a serving base path.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("push", help="copy the newest source version if it differs from the live one")
    s.add_argument("--source", required=True, help="export model dir (<export_base>/<model>) or a version dir")
    s.add_argument("--dest", required=True, help="serving model dir (<serving base>/<model>)")
    s.add_argument("--keep", type=int, default=2, help="versions kept (the new one and its backups)")
    s.add_argument("--retries", type=int, default=3)
    s.add_argument("--retry_wait_s", type=float, default=1.0)
    r = sub.add_parser("rollback", help="remove the newest version; the backup becomes the newest")
    r.add_argument("--dest", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "push":
            res = push(args.source, args.dest, args.keep, args.retries, args.retry_wait_s)
            print(f"sync: {res.action} version {res.version} at {res.path}")
        else:
            print(f"sync: rolled back; version {rollback(args.dest)} is the newest")
    except SyncError as e:
        print(f"sync: FAILED: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
