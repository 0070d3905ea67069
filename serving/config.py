"""Model server configs (TF Serving's ``ModelServerConfig``) and the versions on disk."""
from __future__ import annotations

import os

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2


def read_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parses a text-format ModelServerConfig file (TF Serving's ``--model_config_file``)."""
    with open(path, encoding="utf-8") as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    validate_config(config)
    return config


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Raises ValueError for configs this server cannot serve."""
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("only model_config_list configs are supported")
    names = set()
    for mc in config.model_config_list.config:
        if not mc.name:
            raise ValueError("a model config has no name")
        if mc.name in names:
            raise ValueError(f"model {mc.name!r} configured twice")
        names.add(mc.name)
        if not mc.base_path:
            raise ValueError(f"model {mc.name!r} has no base_path")
        if mc.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {mc.name!r}: platform {mc.model_platform!r} is not 'tensorflow'")
        policy = mc.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific" and not policy.specific.versions:
            raise ValueError(f"model {mc.name!r}: a specific version policy needs versions")


def single_model_config(name: str, base_path: str) -> model_server_config_pb2.ModelServerConfig:
    """The config of ``--model_name``/``--model_base_path`` (latest version only)."""
    config = model_server_config_pb2.ModelServerConfig()
    mc = config.model_config_list.config.add()
    mc.name, mc.base_path, mc.model_platform = name, base_path, "tensorflow"
    return config


def models_under(export_base: str, name: str = "") -> model_server_config_pb2.ModelServerConfig:
    """The config serving every model exported under ``export_base`` (``<base>/<name>/<version>/``),
    or only ``name``: what ``make serve`` serves after ``make train``.

    Raises:
      ValueError: nothing to serve, naming the directory and the models found there.
    """
    found = sorted(d for d in (os.listdir(export_base) if os.path.isdir(export_base) else ())
                   if not d.startswith(".") and os.path.isdir(os.path.join(export_base, d))
                   and list_versions(os.path.join(export_base, d)))
    if name:
        if name not in found:
            raise ValueError(f"no exported model {name!r} under {export_base} (models there: {found or 'none'}); "
                             f"run `make train MODEL={name}` or pass EXPORT_BASE=")
        found = [name]
    if not found:
        raise ValueError(f"no exported model under {export_base}: run `make train` first (it exports to "
                         f"EXPORT_BASE=runs/export), or pass EXPORT_BASE=<dir with <model>/<version>/saved_model.pb>")
    config = model_server_config_pb2.ModelServerConfig()
    for d in found:
        mc = config.model_config_list.config.add()
        mc.name, mc.base_path, mc.model_platform = d, os.path.abspath(os.path.join(export_base, d)), "tensorflow"
    return config


def list_versions(model_path: str) -> dict[int, str]:
    """{version: directory} of the integer-named SavedModel directories under ``model_path``.

    Hidden or non-integer names (temporary copies of exporters and sync) are not versions.
    """
    try:
        names = os.listdir(model_path)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if name.isdigit():
            path = os.path.join(model_path, name)
            if os.path.exists(os.path.join(path, "saved_model.pb")):
                out[int(name)] = path
    return out


def aspired_versions(available, policy) -> set[int]:
    """The versions a ``ServableVersionPolicy`` wants served, out of those on disk."""
    available = sorted(available)
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return set(available)
    if kind == "specific":
        return set(available) & set(policy.specific.versions)
    n = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return set(available[-n:])
