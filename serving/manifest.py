"""Checksum manifest of an exported version: ``assets.extra/checksums.sha256``.

One line per file of the version directory (the manifest itself excluded), in
``sha256sum`` format and sorted by path, so ``cd <version> && sha256sum -c
assets.extra/checksums.sha256`` checks a copy with standard tools. The exporter
writes it; ``serving.sync`` compares it with the live version's and verifies
copies against it.
"""
from __future__ import annotations

import hashlib
import os

from feature_schema import paths

MANIFEST_PATH = os.path.join("assets.extra", "checksums.sha256")
_CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A file is missing, extra, or differs from its manifest line."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def list_files(version_dir: str) -> list[str]:
    """Relative paths (``/``-separated) of every file under ``version_dir`` but the manifest, sorted.

    Raises:
      ChecksumError: a symlink resolves outside ``version_dir`` (a copy would pull in foreign files).
    """
    out = []
    for root, dirs, files in os.walk(version_dir):
        dirs.sort()
        for name in dirs + files:
            full = os.path.join(root, name)
            if os.path.islink(full) and not paths.is_within(version_dir, full):
                raise ChecksumError(f"{full} is a symlink to {os.path.realpath(full)}, outside {version_dir}")
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), version_dir).replace(os.sep, "/")
            if rel != MANIFEST_PATH.replace(os.sep, "/"):
                out.append(rel)
    return sorted(out)


def compute(version_dir: str) -> dict[str, str]:
    """{relative path: sha256 hex} of every file of the version but the manifest."""
    return {rel: file_sha256(os.path.join(version_dir, rel)) for rel in list_files(version_dir)}


def format_manifest(digests: dict[str, str]) -> str:
    return "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))


def write(version_dir: str) -> dict[str, str]:
    """Computes and writes the manifest of ``version_dir``; returns the digests."""
    digests = compute(version_dir)
    path = os.path.join(version_dir, MANIFEST_PATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(format_manifest(digests))
    return digests


def read(version_dir: str) -> dict[str, str]:
    """The manifest of ``version_dir`` as {relative path: sha256 hex}.

    Raises:
      FileNotFoundError: the version has no manifest.
      ChecksumError: a malformed line.
    """
    path = os.path.join(version_dir, MANIFEST_PATH)
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64 or not rel:
                raise ChecksumError(f"{path}:{lineno}: not a '<sha256>  <path>' line: {line!r}")
            try:
                paths.relative_path(rel, "manifest entry")
            except ValueError as e:  # a manifest may not name files outside its version directory
                raise ChecksumError(f"{path}:{lineno}: {e}") from None
            out[rel] = digest
    return out


def verify(version_dir: str, expected: dict[str, str] | None = None) -> None:
    """Checks every file of ``version_dir`` against ``expected`` (default: its own manifest).

    Raises:
      ChecksumError: naming the missing, unexpected and differing files.
    """
    expected = read(version_dir) if expected is None else expected
    actual_files = set(list_files(version_dir))
    missing = sorted(set(expected) - actual_files)
    extra = sorted(actual_files - set(expected))
    differ = sorted(rel for rel in set(expected) & actual_files
                    if file_sha256(os.path.join(version_dir, rel)) != expected[rel])
    if missing or extra or differ:
        raise ChecksumError(f"{version_dir}: checksum manifest mismatch: missing {missing}, "
                            f"unexpected {extra}, differing {differ}")
