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
