"""Confining paths that come from configs and requests to a base directory.

Model names become directory names (``<export_base>/<model>/<version>``), served
configs name base paths, and checksum manifests name files relative to a version
directory. None of them may reach outside the directory the operator chose:
``..`` components, absolute paths and symlinks that leave the base are refused
with a ValueError that names the offending path.
"""
from __future__ import annotations

import os


def plain_name(name: str, what: str = "name") -> str:
    """Returns ``name`` if it is one path component (no separator, not ``.``/``..``, not empty).

    Raises:
      ValueError: naming ``what`` and the value.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{what} {name!r} is not a plain directory name")
    return name


def relative_path(rel: str, what: str = "path") -> str:
    """Returns ``rel`` if it is relative and has no ``..`` component (``a/b.txt``, not ``../x``)."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or "\0" in rel or os.path.isabs(rel) or rel.startswith("/") or ".." in parts:
        raise ValueError(f"{what} {rel!r} is not a relative path inside its directory")
    return rel


def is_within(base: str, path: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``base`` or a path below it."""
    base_real = os.path.realpath(base)
    path_real = os.path.realpath(path)
    return path_real == base_real or path_real.startswith(base_real.rstrip(os.sep) + os.sep)


def within(base: str, path: str, what: str = "path") -> str:
    """``path`` (relative ones are taken relative to ``base``) if it resolves inside ``base``.

    Raises:
      ValueError: the resolved path leaves ``base`` (``..``, an absolute path elsewhere, a symlink).
    """
    full = path if os.path.isabs(path) else os.path.join(base, path)
    if not is_within(base, full):
        raise ValueError(f"{what} {path!r} resolves to {os.path.realpath(full)}, outside {os.path.realpath(base)}")
    return full
