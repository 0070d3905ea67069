"""Brute-force top-K retrieval in the client: the served user tower, then a dot product with every item.

    python -m serving.retrieval topk --server 127.0.0.1:8500 --model two_tower_user \\
        --model_base runs/export/two_tower_user --k 10 [--exclude_exposure] [FILE ...]

Each input line holds one user's features in the log's format, labels optional (``user:u12:1
query:q3:1 hour:h5:1 device:d1:1`` in libffm; libfm takes the export's field map, or
``--field_map``); fields the user tower does not read are ignored. The lines become raw
tf.Examples (``serving.examples.ExampleBuilder``: the client featurizes nothing) sent to the user
tower's ``serving_default`` in one Predict request; the answer's ``user_vector`` rows are scored
against every row of the item-embedding file of the *version that answered*
(``<model_base>/<version>/assets.extra/item_embeddings.tsv``, or ``--items``), so the user and item
vectors always come from one training run. Output: one line per input line, ``key=score`` of the
``k`` best items, best first, tab-separated.

The item-embedding file (written by ``export.retrieval`` into the version it exports, so it is
published with that version, atomically, and covered by its checksum manifest) is a TSV with a
header ``item  log_q  v0 .. v{d-1}``: the item's vocabulary key, the log of its share of training
impressions and its item-tower vector. ``--exclude_exposure`` ranks by ``<u, v> - log_q``: a model
trained with the logQ correction scores ``log P(item | user clicked)``, which includes how often
each item was shown; subtracting ``log_q`` leaves the click propensity alone
(``docs/RETRIEVAL.md``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from serving import protocol
from serving.client import ServingClient, _field_map, _load_schema, parse_lines
from serving.examples import ExampleBuilder

ITEMS_FILE = "item_embeddings.tsv"
USER_VECTOR = "user_vector"
_HEADER = ("item", "log_q")


@dataclasses.dataclass(frozen=True)
class ItemIndex:
    """Every retrievable item: ``keys`` [n], ``log_q`` [n] and ``vectors`` [n, d] (float32)."""

    keys: tuple[str, ...]
    log_q: np.ndarray
    vectors: np.ndarray

    def top_k(self, users: np.ndarray, k: int, exclude_exposure: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(item indices, scores)``, both ``[len(users), min(k, n)]``, best first, of ``<u, v>``
        (minus ``log_q`` with ``exclude_exposure``); ties go to the lower index."""
        users = np.asarray(users, np.float32)
        if users.ndim != 2 or users.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"user vectors of shape {users.shape} do not match items of dimension "
                             f"{self.vectors.shape[1]}")
        scores = users @ self.vectors.T
        if exclude_exposure:
            scores -= self.log_q[None, :]
        k = min(k, len(self.keys))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(scores, order, axis=1)


def write_item_embeddings(path: str, keys, log_q, vectors) -> None:
    """Writes the item-embedding TSV (floats with 9 significant digits: float32 reads back exactly)."""
    vectors = np.asarray(vectors, np.float32)
    if len(keys) != len(vectors) or len(keys) != len(log_q):
        raise ValueError(f"{len(keys)} keys, {len(log_q)} log q and {len(vectors)} vectors")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(_HEADER + tuple(f"v{i}" for i in range(vectors.shape[1]))) + "\n")
        for key, lq, vec in zip(keys, log_q, vectors):
            if "\t" in key or "\n" in key:
                raise ValueError(f"item key {key!r} holds a tab or newline")
            f.write(key + "\t" + "\t".join(f"{x:.9g}" for x in (float(lq), *vec.tolist())) + "\n")


def read_item_embeddings(path: str) -> ItemIndex:
    """Reads an item-embedding TSV.

    Raises:
      ValueError: a bad header, or a line (named by its number) with the wrong number of columns or a
        value that is not a number.
    """
    keys, rows = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if tuple(header[:2]) != _HEADER or len(header) < 3:
            raise ValueError(f"{path}: header {header[:3]} is not item, log_q, v0 ...")
        for lineno, line in enumerate(f, start=2):
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(header):
                raise ValueError(f"{path}:{lineno}: {len(cells)} columns, expected {len(header)}")
            try:
                rows.append([float(c) for c in cells[1:]])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: a value of item {cells[0]!r} is not a number") from None
            keys.append(cells[0])
    table = np.asarray(rows, np.float32).reshape(len(rows), len(header) - 1)
    return ItemIndex(tuple(keys), table[:, 0].copy(), np.ascontiguousarray(table[:, 1:]))


def item_file(model_base: str, version: int) -> str:
    """The item-embedding file of one exported version."""
    return os.path.join(model_base, str(version), protocol.ASSETS_EXTRA, ITEMS_FILE)


def user_vectors(client: ServingClient, examples) -> tuple[np.ndarray, int]:
    """``(user vectors [n, d], version)`` of serialized raw Examples of users, from the served user tower."""
    pred = client.score_examples(list(examples), output_filter=(USER_VECTOR,))
    return pred.outputs[USER_VECTOR], pred.version


def top_k(client: ServingClient, examples, k: int, model_base: str = "", items: ItemIndex | None = None,
          exclude_exposure: bool = False) -> tuple[list[list[tuple[str, float]]], int]:
    """Each user's ``k`` best ``(item key, score)``, best first, and the version that served the user tower.

    Args:
      client: client of the served user tower.
      examples: serialized raw Examples of the users' features.
      k: items per user.
      model_base: the served model's base path: the answering version's item file is read from it.
      items: an item index to use instead (then ``model_base`` is not read).
      exclude_exposure: rank by ``<u, v> - log_q``.
    """
    users, version = user_vectors(client, examples)
    if items is None:
        if not model_base:
            raise ValueError("pass model_base (the exported versions) or an item index")
        items = read_item_embeddings(item_file(model_base, version))
    order, scores = items.top_k(users, k, exclude_exposure)
    return [[(items.keys[i], float(s)) for i, s in zip(o, sc)] for o, sc in zip(order, scores)], version


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Top-K items for users: served user tower + brute-force dot product.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("topk", help="the k best items of each input line's user")
    s.add_argument("--server", default="127.0.0.1:8500")
    s.add_argument("--model", required=True, help="served name of the user tower")
    s.add_argument("--version", type=int, default=None)
    s.add_argument("--model_base", default="", help="the user tower's base path (holds the version directories)")
    s.add_argument("--items", default="", help="an item-embedding TSV instead of the answering version's")
    s.add_argument("--schema", default="", help="export version dir or schema.json (default: the served version's)")
    s.add_argument("--field_map", default="", help="feature<TAB>field TSV (libfm; default: the export's copy)")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--exclude_exposure", action="store_true", help="rank by <u, v> - log_q (click propensity)")
    s.add_argument("--timeout", type=float, default=10.0)
    s.add_argument("inputs", nargs="*", default=["-"], help="files of lines (- : stdin)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.items or args.model_base):
        p.error("pass --model_base (the exported versions) or --items")
    lines = []
    for path in args.inputs:
        if path == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                text = f.read()
        lines.extend(line for line in text.splitlines() if line.strip())
    schema_path = args.schema
    if not schema_path:
        if not args.model_base:
            p.error("pass --schema with --items")
        versions = sorted(int(d) for d in os.listdir(args.model_base) if d.isdigit())
        schema_path = os.path.join(args.model_base, str(args.version or versions[-1]))
    schema = _load_schema(schema_path)
    builder = ExampleBuilder(schema, _field_map(schema_path, args.field_map) if schema.format == "libfm" else None)
    try:
        examples = [builder.example(f) for f in parse_lines(builder, lines)[1]]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    items = read_item_embeddings(args.items) if args.items else None
    with ServingClient(args.server, args.model, args.version, timeout_s=args.timeout) as client:
        results, _ = top_k(client, examples, args.k, args.model_base, items, args.exclude_exposure)
    for best in results:
        print("\t".join(f"{key}={score:.6f}" for key, score in best))


if __name__ == "__main__":
    main()
