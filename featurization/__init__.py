"""The featurization layer (TF): the ETL's schema and vocabulary applied in the graph.

Imports ``feature_schema`` and TensorFlow only; the trainer's input pipeline and the exporter use it.
"""
from featurization.layer import Featurizer, fingerprint_int64

__all__ = ["Featurizer", "fingerprint_int64"]
