"""The feature-schema contract shared by ETL, trainer and exporter.

This package is at the bottom of the import graph: it imports neither Beam nor
TensorFlow, so every stage can read the schema the ETL wrote.
"""
from feature_schema.hashing import HASH_FUNCTION, feature_hash, feature_key, field_hash, string_hash
from feature_schema.schema import (
    SCHEMA_FILENAME,
    VOCAB_FILENAME,
    EntityTableSpec,
    ExampleKeys,
    FieldSpec,
    LabelSpec,
    Schema,
    VectorFieldSpec,
    VocabEntry,
    load_schema,
    parse_vocabulary_line,
    read_vocabulary,
    write_vocabulary_lines,
)

__all__ = [
    "SCHEMA_FILENAME",
    "VOCAB_FILENAME",
    "EntityTableSpec",
    "ExampleKeys",
    "FieldSpec",
    "LabelSpec",
    "Schema",
    "HASH_FUNCTION",
    "feature_hash",
    "string_hash",
    "feature_key",
    "field_hash",
    "VectorFieldSpec",
    "VocabEntry",
    "load_schema",
    "parse_vocabulary_line",
    "read_vocabulary",
    "write_vocabulary_lines",
]
