"""The Beam ETL (docs/ETL.md).

Importing Beam logs "apitools not found, and bigquery client libraries are not available"
on the root logger when the optional GCP client libraries are absent (they are: this job
reads GCS through Beam's own client). The warning is noise to a `make etl` user; a filter on
the root logger drops that one message and nothing else.
"""
import logging


class _DropBeamImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_DropBeamImportNoise())
