"""Security defaults that can be checked statically: no code execution on any input."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("feature_schema", "etl", "trainer", "export", "serving", "generator", "bench")
# Calls that would execute or unpickle data handed to the pipeline, a model config or a request.
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}


def _sources():
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)


def test_no_eval_exec_pickle_or_unsafe_yaml_in_product_code():
    problems = []
    sources = list(_sources())
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        rel = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in FORBIDDEN_CALLS:
                    problems.append(f"{rel}:{node.lineno} calls {f.id}()")
                if isinstance(f, ast.Attribute) and f.attr in ("load", "loads") and \
                        isinstance(f.value, ast.Name) and f.value.id in FORBIDDEN_MODULES | {"yaml"}:
                    problems.append(f"{rel}:{node.lineno} calls {f.value.id}.{f.attr}()")
                if isinstance(f, ast.Attribute) and f.attr == "unsafe_load":
                    problems.append(f"{rel}:{node.lineno} calls unsafe_load()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [n for n in names if n.split(".")[0] in FORBIDDEN_MODULES]
                if bad:
                    problems.append(f"{rel}:{node.lineno} imports {bad}")
    assert problems == []


# Paths from configs and requests stay inside their base directory.

import grpc  # noqa: E402
import pytest  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tensorflow_serving.apis import model_management_pb2  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402

from feature_schema import paths  # noqa: E402
from serving import manifest, server, sync  # noqa: E402


def _config(*models):
    text = "model_config_list {" + "".join(
        f' config {{ name: "{n}" base_path: "{p}" model_platform: "tensorflow" }}' for n, p in models) + "}"
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def test_path_helpers_refuse_escapes(tmp_path):
    assert paths.plain_name("fm") == "fm"
    for bad in ("", ".", "..", "a/b", "../fm", "a\\b"):
        with pytest.raises(ValueError, match="not a plain directory name"):
            paths.plain_name(bad)
    assert paths.relative_path("assets.extra/schema.json") == "assets.extra/schema.json"
    for bad in ("/etc/passwd", "../x", "a/../../x", ""):
        with pytest.raises(ValueError, match="not a relative path"):
            paths.relative_path(bad)
    base = tmp_path / "base"
    (base / "fm").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", base / "link")
    assert paths.within(str(base), "fm") == os.path.join(str(base), "fm")
    for bad in ("../outside", str(tmp_path / "outside"), "link", "fm/../../outside"):
        with pytest.raises(ValueError, match="outside"):
            paths.within(str(base), bad)


def test_manifest_refuses_entries_and_symlinks_outside_the_version(tmp_path):
    version = tmp_path / "1"
    (version / "variables").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"graph")
    manifest.write(str(version))
    assert set(manifest.read(str(version))) == {"saved_model.pb"}
    mpath = version / manifest.MANIFEST_PATH
    mpath.write_text(mpath.read_text() + "0" * 64 + "  ../../etc/passwd\n")
    with pytest.raises(manifest.ChecksumError, match="line 2|:2:"):
        manifest.read(str(version))
    manifest.write(str(version))
    (tmp_path / "secret").write_text("not part of the model")
    os.symlink(tmp_path / "secret", version / "variables" / "leak")
    with pytest.raises(manifest.ChecksumError, match="outside"):
        manifest.write(str(version))
    # sync refuses to publish it: nothing appears in the destination.
    with pytest.raises(sync.SyncError):
        sync.push(str(version), str(tmp_path / "dest"), retries=0, sleep=lambda s: None)
    assert sync.versions(str(tmp_path / "dest")) == []


def test_served_model_directories_stay_inside_the_base_path(tmp_path):
    base = tmp_path / "models"
    (base / "fm").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a plain directory name"):
        server.ModelManager(_config(("evil", "/models/..")), base_path=str(base))
    mgr = server.ModelManager(_config(("fm", "/models/fm")), base_path=str(base))
    try:
        assert mgr.models["fm"].base_path == os.path.join(str(base), "fm")
        # A client-sent config (HandleReloadConfigRequest) with an escaping path is INVALID_ARGUMENT
        # and leaves the served models as they were.
        req = model_management_pb2.ReloadConfigRequest(config=_config(("fm", "/models/fm"), ("x", "/x/..")))
        with pytest.raises(server.ServingError) as e:
            mgr.handlers.reload_config(req)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'x'" in e.value.message
        assert list(mgr.models) == ["fm"]
    finally:
        mgr.stop()
    # Without --base_path, client configs may name base paths only under the startup config's directories.
    (tmp_path / "other").mkdir()
    mgr = server.ModelManager(_config(("fm", str(base / "fm"))))
    try:
        assert mgr.roots == [str(base)]
        mgr.check_request_config(_config(("fm", str(base / "fm")), ("ctr", str(base / "ctr"))))
        for bad in (str(tmp_path / "other"), str(base / ".." / "other"), "/etc"):
            with pytest.raises(ValueError, match="outside the server's roots"):
                mgr.check_request_config(_config(("fm", bad)))
    finally:
        mgr.stop()


def test_exporter_refuses_a_model_name_that_is_a_path(served_export, tmp_path):
    from export import exporter
    with pytest.raises(ValueError, match="not a plain directory name"):
        exporter.export(served_export["runs"]["lr"], str(tmp_path), model_name="../escape")
    assert not os.path.exists(tmp_path.parent / "escape")
