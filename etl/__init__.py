"""Beam ETL: libfm/libffm logs -> sparse TFRecords + the feature schema."""
