"""Runs every benchmark module ``bench/bench_*.py`` (each has ``main(argv)``), in name order.

    python -m bench.run_all [--only etl,input] [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import bench


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma list of benchmark names (bench_<name>)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    names = discover()
    if args.only:
        wanted = {f"bench_{n}" for n in args.only.split(",")}
        unknown = wanted - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmarks {sorted(unknown)}; available: {names}")
        names = [n for n in names if n in wanted]
    if not names:
        raise SystemExit("no benchmark modules found in bench/")
    for name in names:
        print(f"=== {name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main(rest)


if __name__ == "__main__":
    main()
