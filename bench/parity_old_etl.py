"""Parity with the ETL that wrote vocabulary rows itself: its output vs this ETL's records through the layer.

    git worktree add /tmp/old 431cac5 && (cd /tmp/old && python -m etl.pipeline <flags> --out /tmp/old_out)
    python -m etl.pipeline <the same flags> --out /tmp/new_out
    python -m bench.parity_old_etl /tmp/old_out /tmp/new_out

Commit 431cac5 is the last ETL that wrote ``feat_ids``/``feat_vals``/``feat_fields`` (rows, values,
field ids, missing fields filled). Prints whether vocabulary.tsv and the field layout are
identical and, per split, whether the multisets of per-record sorted (field id, row, value) agree.
"""
import collections
import glob
import json
import os
import sys

import numpy as np
import tensorflow as tf

from feature_schema import load_schema
from trainer import data

old, new = sys.argv[1:3]
ov = open(os.path.join(old, "vocabulary.tsv")).read()
nv = open(os.path.join(new, "vocabulary.tsv")).read()
print("vocabulary.tsv identical:", ov == nv)
of = json.load(open(os.path.join(old, "schema.json")))["fields"]
nf = json.load(open(os.path.join(new, "schema.json")))["fields"]
keys = ("name", "id", "kind", "offset", "vocab_size", "rare_id", "bin_boundaries")
print("fields identical:", [{k: f[k] for k in keys} for f in of] == [{k: f[k] for k in keys} for f in nf])
schema = load_schema(new)
for split in ("train", "eval"):
    want = collections.Counter()
    files = sorted(glob.glob(os.path.join(old, split, "*.tfrecord.gz")))
    for r in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        f = tf.train.Example.FromString(r.numpy()).features.feature
        want[tuple(sorted(zip(f["feat_fields"].int64_list.value, f["feat_ids"].int64_list.value,
                              np.round(f["feat_vals"].float_list.value, 5))))] += 1
    got = collections.Counter()
    for feats, _, _ in data.make_dataset(schema, split, 4096):
        ids, vals, flds = feats["ids"], feats["values"], feats["fields"]
        per = collections.defaultdict(list)
        for (b, _), fi, r, v in zip(ids.indices.numpy(), flds.values.numpy(), ids.values.numpy(), vals.values.numpy()):
            per[b].append((int(fi), int(r), float(np.round(v, 5))))
        for b in range(int(ids.dense_shape[0])):
            got[tuple(sorted(per[b]))] += 1
    n = sum(want.values())
    print(f"{split}: old records {n}, new records {sum(got.values())}, identical multisets: {got == want}, "
          f"records differing: {sum((want - got).values())}")
