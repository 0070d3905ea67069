"""Raw tf.Examples from log lines: what a client sends, built with the ETL's own parser.

The client featurizes nothing: it parses a libfm/libffm line with ``etl.parsing`` (the Beam-free
parser the ETL runs, so every format the ETL accepts is accepted here: named or integer field
ids, in-line numbers, multi-label lines), gives libfm features their field from the field map,
and writes one Example feature per field (``featurization.raw`` states the contract). Hashing,
vocabulary rows, bins, scaling, joins and missing fields all happen in the served graph.
"""
from __future__ import annotations

import csv

from etl import parsing
from feature_schema import Schema
from serving import protocol

NO_FEATURE_LIMIT = 1 << 30


def read_field_map(path: str) -> dict[str, str]:
    """{feature key: field} of a TSV field map with the header ``feature<TAB>field``."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        if header[:2] != ["feature", "field"]:
            raise ValueError(f"{path}: header {header} must start with feature, field")
        return {row[0]: row[1] for row in reader if len(row) >= 2}


class ExampleBuilder:
    """Turns log lines into raw tf.Examples of the schema's fields.

    Args:
      schema: the served model's schema (format, labels, libffm field index, field kinds).
      field_map: feature key -> field, for libfm lines.
    """

    def __init__(self, schema: Schema, field_map: dict | None = None):
        if schema.format == "libfm" and field_map is None:
            raise ValueError("libfm lines carry no fields: pass the field map (the export's "
                             "assets.extra/field_map.tsv, or --field_map)")
        self.fmt = schema.format
        self.num_labels = len(schema.labels)
        self.field_index = tuple(schema.field_index) or None
        self.value_fields = {f.name for f in schema.fields if f.kind != "categorical"}
        self.field_map = field_map

    def parse(self, line) -> tuple[tuple[float, ...] | None, list[tuple[str, str, float]]]:
        """(labels, (field, key, value) features) of one line, as the ETL parses it.

        A line may omit the labels (a request rather than a log line): its labels are None.

        Raises:
          parsing.ParseError: the line is malformed (its ``reason`` is the ETL's dead-letter reason).
        """
        text = parsing.decode(line)
        head = text.split(None, 1)[:1]
        unlabelled = bool(head) and ":" in head[0]
        if unlabelled:
            text = ",".join(["0"] * self.num_labels) + " " + text
        labels, feats = parsing.parse_record(text, self.fmt, self.num_labels, NO_FEATURE_LIMIT, self.field_index)
        labels = None if unlabelled else labels
        if self.fmt == "libfm":
            feats = parsing.assign_fields(feats, self.field_map)
        return labels, list(feats)

    def example(self, features) -> bytes:
        """The serialized raw Example of ``(field, key, value)`` features (``protocol.raw_example``)."""
        return protocol.raw_example(features, self.value_fields)

    def line_example(self, line) -> tuple[tuple[float, ...], bytes]:
        """(labels, serialized raw Example) of one line."""
        labels, feats = self.parse(line)
        return labels, self.example(feats)

    def split(self, features, context_fields) -> tuple[list, list]:
        """(context features, candidate features) of one line: the fields in ``context_fields`` go to
        the context (what one request's candidates share: user, query, time)."""
        ctx = [f for f in features if f[0] in context_fields]
        return ctx, [f for f in features if f[0] not in context_fields]
