"""CTR/CVR ranking pipeline: Beam ETL -> TensorFlow trainer -> TF Serving export."""
from setuptools import find_packages, setup

setup(
    name="ctr-pipeline",
    version="0.1.0",
    description="Production CTR/CVR ranking pipeline: Beam ETL, TensorFlow trainer, TF Serving export",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["feature_schema*", "featurization*", "etl*", "trainer*", "export*", "serving*",
                                    "generator*", "bench*"]),
    install_requires=[
        # Versions that resolve together (checked on Python 3.11, see docs/DESIGN.md).
        "tensorflow==2.21.0",
        # Keras 3 cannot export models with tf.SparseTensor inputs; tf-keras (Keras 2) can.
        "tf-keras==2.21.0",
        "tensorboard>=2.20,<2.22",
        "tensorflow-serving-api==2.21.0",
        "apache-beam==2.77.0",
        # Beam's WriteToTFRecord needs a crc32c implementation.
        "google-crc32c>=1.5",
        "pyarrow>=15,<27",
        # FarmHash Fingerprint64 == tf.fingerprint: one feature hash in ETL and serving graph.
        "pyfarmhash==0.5.1",
        "pyyaml>=6",
        "numpy>=1.26",
        "matplotlib>=3.8",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6"],
        # bench/bench_train.py's DeepFM comparison: DeepCTR 0.9.4 runs on tf-keras (TF_USE_LEGACY_KERAS=1).
        "bench": ["deepctr==0.9.4", "pandas>=2", "scikit-learn>=1.4"],
    },
)
