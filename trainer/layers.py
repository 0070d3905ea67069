"""Interaction layers over sparse features.

Every layer takes the batch's sparse features as a dict of ``tf.SparseTensor``s
``{"ids", "values", "fields"}`` of dense shape ``[batch, max_nnz]`` (vocabulary
rows, values, field ids: see ``trainer.data``) and returns a dense tensor.
Tables are sized from the schema (``num_features``, ``num_fields``); nothing is
hard-coded. Every layer also reads the featurization layer's dense layout (the
single-valued fields as ``"dense_ids"``/``"dense_values"``/``"dense_fields"``
``[batch, S]``, the multi-hot ones sparse): ``sparse_parts`` gives both as one
list of features, and ``Linear`` and ``FieldEmbedding`` read the dense columns
directly (one gather, no segment sums).
"""
from __future__ import annotations

import tensorflow as tf
import tf_keras as keras

from featurization.layer import DENSE_FIELDS, DENSE_IDS, DENSE_VALUES


def sparse_parts(features):
    """(row of each feature in the batch, ids, values, fields, batch size) of a sparse batch; the
    dense layout's columns are appended as features of their rows."""
    ids = features["ids"]
    rows = ids.indices[:, 0]
    batch = ids.dense_shape[0]
    parts = [rows, ids.values, features["values"].values, features["fields"].values]
    if DENSE_IDS not in features:
        return (*parts, batch)
    d_ids = features[DENSE_IDS]
    d_rows = tf.repeat(tf.range(batch), tf.shape(d_ids, out_type=tf.int64)[1])
    dense = [d_rows, d_ids, features[DENSE_VALUES], features[DENSE_FIELDS]]
    return (*[tf.concat([a, tf.reshape(b, [-1])], 0) for a, b in zip(parts, dense)], batch)


def all_fields_dense(features, num_fields: int) -> bool:
    """True when the batch is in the dense layout and its columns are every field (in id order)."""
    return DENSE_IDS in features and features[DENSE_IDS].shape[1] == num_fields


# Tables up to this many elements get a dense gradient (see ``lookup``); larger ones a sparse one.
DENSE_GRADIENT_MAX_ELEMENTS = 1 << 22


def lookup(table, ids: tf.Tensor) -> tf.Tensor:
    """``table[ids]`` with the gradient the table's size calls for.

    A sparse gradient (``tf.IndexedSlices``, one row per occurrence) makes the optimizer deduplicate
    the rows (``tf.unique`` + a segment sum) and scatter its update; that pays off only when a batch
    touches a small share of a large table. A small table (at most ``DENSE_GRADIENT_MAX_ELEMENTS``)
    gets the summed dense gradient in one scatter-add instead and a dense optimizer update, which XLA
    (``train.jit_compile``) fuses. Both give the same update: Keras' optimizers treat a row missing
    from a sparse gradient like a zero row of a dense one.
    Sharded tables (``ParameterServerStrategy``) keep ``embedding_lookup`` and sparse gradients.
    """
    if (tf.distribute.has_strategy() or not isinstance(table, tf.Variable)
            or table.shape.num_elements() > DENSE_GRADIENT_MAX_ELEMENTS):
        return tf.nn.embedding_lookup(table, ids)
    return _gather_dense_gradient(tf.convert_to_tensor(table), ids)


def _gather_dense_gradient(params: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    @tf.custom_gradient
    def gather(p):
        def grad(dy):
            return tf.math.unsorted_segment_sum(dy, ids, tf.shape(p, out_type=ids.dtype)[0])
        return tf.gather(p, ids), grad
    return gather(params)


def field_sums(values: tf.Tensor, rows: tf.Tensor, fields: tf.Tensor, batch, num_fields: int) -> tf.Tensor:
    """``out[b, f] = sum of values[i] over the features i of example b in field f``: ``[batch, F, ...]``."""
    out = tf.math.unsorted_segment_sum(values, rows * num_fields + fields, batch * num_fields)
    return tf.reshape(out, tf.concat([[-1, num_fields], tf.shape(values)[1:]], 0))


def _touched_l2(rows_emb: tf.Tensor, l2: float) -> tf.Tensor:
    """``l2/2 * sum ||w||^2`` over the table rows a batch touched, once per use (as libffm does:
    the gradient per use is ``l2 * w``, so ``l2`` means what ``ffm-train -l`` means)."""
    return 0.5 * l2 * tf.reduce_sum(tf.square(rows_emb))


class Linear(keras.layers.Layer):
    """First-order term with global bias: ``y = w0 + sum_i w_{id_i} x_i``.

    (Logistic regression; the linear part of Rendle, "Factorization Machines", ICDM 2010;
    the wide part of Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016.)

    Input: sparse features. Output: ``[batch, 1]`` logits.

    Args:
      num_features: rows of the weight table (schema ``num_features``).
      l2: L2 penalty on the rows a batch touches.
      fields: if not empty, only features of these field ids count (a wide part over chosen fields).
    """

    def __init__(self, num_features: int, l2: float = 0.0, fields=(), **kwargs):
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.l2 = l2
        self.fields = tuple(int(f) for f in fields)

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(self.num_features, 1), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(1,), initializer="zeros")
        super().build(input_shape)

    def call(self, features):
        if DENSE_IDS in features and not self.fields:
            return self._dense_call(features)
        rows, ids, values, fields, batch = sparse_parts(features)
        w = lookup(self.w, ids)
        if self.fields:
            keep = 1.0 - _not_in(fields, self.fields)
            w = w * keep[:, None]  # other fields neither contribute nor get L2
        if self.l2:
            self.add_loss(_touched_l2(w, self.l2) / tf.cast(batch, tf.float32))
        out = tf.math.unsorted_segment_sum(w * values[:, None], rows, batch)
        return out + self.bias

    def _dense_call(self, features):
        """The same sum on the dense layout: the dense columns' weights in one ``[batch, S]`` gather."""
        w = lookup(self.w, features[DENSE_IDS])[..., 0]                          # [B, S]
        out = tf.reduce_sum(w * features[DENSE_VALUES], axis=1, keepdims=True)
        sparse = features["ids"]
        rows, batch = sparse.indices[:, 0], sparse.dense_shape[0]
        w_sparse = lookup(self.w, sparse.values)                                  # multi-hot fields
        out += tf.math.unsorted_segment_sum(w_sparse * features["values"].values[:, None], rows, batch)
        if self.l2:
            self.add_loss((_touched_l2(w, self.l2) + _touched_l2(w_sparse, self.l2)) / tf.cast(batch, tf.float32))
        return out + self.bias

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "l2": self.l2,
                "fields": list(self.fields)}


class FMInteraction(keras.layers.Layer):
    """Second-order FM term (Rendle, "Factorization Machines", ICDM 2010).

        y = sum_{i<j} <v_i, v_j> x_i x_j
          = 1/2 sum_k [ (sum_i v_{i,k} x_i)^2 - sum_i v_{i,k}^2 x_i^2 ]

    Features of ``linear_only_fields`` take part in no pair.

    Input: sparse features. Output: ``[batch, 1]``.

    Args:
      num_features: rows of the latent table.
      embedding_dim: latent dimension k.
      linear_only_fields: field ids excluded from interactions.
      l2: L2 penalty on the latent rows a batch touches.
      init_stddev: stddev of the normal initializer.
    """

    def __init__(self, num_features: int, embedding_dim: int, linear_only_fields=(), l2: float = 0.0,
                 init_stddev: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.num_features = num_features
        self.embedding_dim = embedding_dim
        self.linear_only_fields = tuple(int(f) for f in linear_only_fields)
        self.l2 = l2
        self.init_stddev = init_stddev

    def build(self, input_shape):
        self.v = self.add_weight(name="v", shape=(self.num_features, self.embedding_dim),
                                 initializer=keras.initializers.RandomNormal(stddev=self.init_stddev))
        super().build(input_shape)

    def call(self, features):
        rows, ids, values, fields, batch = sparse_parts(features)
        v = lookup(self.v, ids)
        if self.l2:
            self.add_loss(_touched_l2(v, self.l2) / tf.cast(batch, tf.float32))
        x = values
        if self.linear_only_fields:
            x = x * _not_in(fields, self.linear_only_fields)
        vx = v * x[:, None]
        s = tf.math.unsorted_segment_sum(vx, rows, batch)
        sq = tf.math.unsorted_segment_sum(tf.square(vx), rows, batch)
        return 0.5 * tf.reduce_sum(tf.square(s) - sq, axis=1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "embedding_dim": self.embedding_dim,
                "linear_only_fields": list(self.linear_only_fields), "l2": self.l2,
                "init_stddev": self.init_stddev}


class FFMInteraction(keras.layers.Layer):
    """Field-aware pairwise term (Juan et al., "Field-aware Factorization Machines for CTR
    Prediction", RecSys 2016; libffm).

        y = r * sum_{i<j} <v_{i, f_j}, v_{j, f_i}> x_i x_j,
        r = 1 / sum_i x_i^2 if ``normalize`` (libffm's instance-wise normalisation) else 1,

    where ``v_{i, f}`` is the latent vector of feature i used against field f. Features of
    ``linear_only_fields`` take part in no pair (nor in r). Two features of the same field (multi-hot)
    pair through ``<v_{i, f}, v_{j, f}>`` as in libffm.

    Input: sparse features. Output: ``[batch, 1]``. Table: ``[num_features, num_fields, k]``.

    L2 follows libffm: every latent vector a pair *uses* adds ``l2/2 * ||v||^2`` per use (gradient
    ``l2 * v`` per use, the same lambda as ``ffm-train -l``), summed and divided by the batch size
    like the log loss.

    Computed in field space: with ``grid[b, g, h] = sum over the features i of field g in example b
    of x_i v_{i, h}`` (``[batch, F, F, k]``),

        sum_{g, h} <grid[b, g, h], grid[b, h, g]> = sum_{i, j} <v_{i, f_j}, v_{j, f_i}> x_i x_j,

    every pair twice plus the ``i = j`` terms ``x_i^2 ||v_{i, f_i}||^2``, which are taken off. When no
    crossed field is multi-hot (at most one feature per field and example, which the ETL enforces
    for fields not declared ``multi_hot``), the grid is one gather of table rows per (example, field)
    slot; otherwise each feature's rows are gathered and summed into the grid.

    Args:
      num_features: rows of the latent table (schema ``num_features``).
      num_fields: fields (schema ``num_fields``).
      embedding_dim: latent dimension k.
      linear_only_fields: field ids excluded from interactions.
      normalize: libffm's instance-wise normalisation.
      l2: L2 penalty per use of a latent vector.
      init: ``normal`` (N(0, init_stddev^2)) or ``uniform`` (libffm's U(0, 1/sqrt(k))).
      init_stddev: stddev of the normal initializer.
      multi_hot_fields: field ids whose features may repeat within an example (schema ``multi_hot``).
        Declaring none promises at most one feature per crossed field and example; a batch that
        breaks the promise counts only the largest id of a repeated field.
    """

    def __init__(self, num_features: int, num_fields: int, embedding_dim: int, linear_only_fields=(),
                 normalize: bool = False, l2: float = 0.0, init: str = "normal", init_stddev: float = 0.01,
                 multi_hot_fields=(), **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1 or num_fields < 1 or num_features < 1:
            raise ValueError(f"FFM needs positive sizes, got features={num_features} fields={num_fields} "
                             f"k={embedding_dim}")
        if init not in ("normal", "uniform"):
            raise ValueError(f"init must be normal or uniform, got {init!r}")
        self.num_features = num_features
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.linear_only_fields = tuple(int(f) for f in linear_only_fields)
        self.normalize = normalize
        self.l2 = l2
        self.init = init
        self.init_stddev = init_stddev
        self.multi_hot_fields = tuple(int(f) for f in multi_hot_fields)

    def build(self, input_shape):
        if self.init == "uniform":
            initializer = keras.initializers.RandomUniform(0.0, 1.0 / float(self.embedding_dim) ** 0.5)
        else:
            initializer = keras.initializers.RandomNormal(stddev=self.init_stddev)
        self.v = self.add_weight(name="v", shape=(self.num_features, self.num_fields, self.embedding_dim),
                                 initializer=initializer)
        super().build(input_shape)

    def call(self, features):
        rows, ids, x, fields, batch = sparse_parts(features)
        crossed = _not_in(fields, self.linear_only_fields)
        x = x * crossed
        if set(self.multi_hot_fields) - set(self.linear_only_fields):
            both, own, penalty = self._by_feature(rows, ids, x, fields, crossed, batch)
        else:
            both, own, penalty = self._by_slot(rows, ids, x, fields, crossed, batch)
        out = 0.5 * (both - own)
        if self.normalize:
            out = out / tf.maximum(tf.math.unsorted_segment_sum(tf.square(x), rows, batch), 1e-12)
        if self.l2:
            self.add_loss(0.5 * self.l2 * penalty / tf.cast(batch, tf.float32))
        return out[:, None]

    def _by_slot(self, rows, ids, x, fields, crossed, batch):
        """(pairs both ways and i = j terms [B], own terms [B], sum of ||v||^2 over uses) with one
        feature per (example, field) slot at most."""
        f = self.num_fields
        slots, n = rows * f + fields, batch * f
        slot_ids = tf.maximum(tf.math.unsorted_segment_max(ids, slots, n), 0)   # an empty slot: row 0
        xs = tf.reshape(tf.math.unsorted_segment_sum(x, slots, n), [-1, f])      # 0: empty or not crossed
        used = tf.reshape(tf.math.unsorted_segment_sum(crossed, slots, n), [-1, f])
        v = tf.reshape(lookup(self.v, slot_ids), [-1, f, f, self.embedding_dim])  # v[b, g, h]
        grid = v * xs[:, :, None, None]
        both = tf.reduce_sum(grid * tf.transpose(grid, [0, 2, 1, 3]), axis=[1, 2, 3])
        sq = tf.reduce_sum(tf.square(v), -1)                                      # [B, F, F]
        eye = tf.eye(f)
        own = tf.reduce_sum(tf.reduce_sum(sq * eye, -1) * tf.square(xs), -1)     # x^2 ||v_{g, g}||^2
        if not self.l2:
            return both, own, 0.0
        # Slot g uses v_{g, h} once per other crossed slot h.
        uses = used[:, :, None] * (used[:, None, :] - eye)
        return both, own, tf.reduce_sum(sq * uses)

    def _by_feature(self, rows, ids, x, fields, crossed, batch):
        """The same as ``_by_slot`` for any number of features per (example, field)."""
        v = lookup(self.v, ids)                                                   # [nnz, F, k]
        grid = field_sums(v * x[:, None, None], rows, fields, batch, self.num_fields)
        both = tf.reduce_sum(grid * tf.transpose(grid, [0, 2, 1, 3]), axis=[1, 2, 3])
        sq = tf.reduce_sum(tf.square(v), -1)                                      # [nnz, F]
        own_field = tf.one_hot(fields, self.num_fields)
        own = tf.math.unsorted_segment_sum(tf.reduce_sum(sq * own_field, -1) * tf.square(x), rows, batch)
        if not self.l2:
            return both, own, 0.0
        # Feature i uses v_{i, g} once per other crossed feature of field g in its example.
        count = field_sums(crossed, rows, fields, batch, self.num_fields)        # [B, F]
        uses = crossed[:, None] * (tf.gather(count, rows) - own_field)
        return both, own, tf.reduce_sum(sq * uses)

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "num_fields": self.num_fields,
                "embedding_dim": self.embedding_dim, "linear_only_fields": list(self.linear_only_fields),
                "normalize": self.normalize, "l2": self.l2, "init": self.init, "init_stddev": self.init_stddev,
                "multi_hot_fields": list(self.multi_hot_fields)}


def _not_in(fields, excluded):
    """1.0 where the field id is not in ``excluded`` (same shape as ``fields``)."""
    if not excluded:
        return tf.ones_like(fields, tf.float32)
    hit = tf.reduce_any(tf.equal(fields[..., None], tf.constant(excluded, tf.int64)), axis=-1)
    return 1.0 - tf.cast(hit, tf.float32)


class FieldEmbedding(keras.layers.Layer):
    """Field-wise pooled embeddings (the "embedding layer" of Guo et al., "DeepFM", IJCAI 2017, and
    Cheng et al., "Wide & Deep", DLRS 2016; pooling of multi-hot fields as in Covington et al.,
    "Deep Neural Networks for YouTube Recommendations", RecSys 2016).

        e_f = sum_{i in field f} v_{id_i} x_i           (combiner ``sum``)
        e_f = (1 / n_f) sum_{i in field f} v_{id_i} x_i  (combiner ``mean``; n_f features of f)

    A field absent from an example gives ``e_f = 0``.

    Input: sparse features. Output: ``[batch, num_fields, k]``.

    Args:
      num_features: rows of the table (schema ``num_features``).
      num_fields: fields (schema ``num_fields``).
      embedding_dim: k.
      combiner: ``sum`` or ``mean``.
      l2: L2 on the rows a batch touches (``l2/2 * ||v||^2`` per use).
      init_stddev: stddev of the normal initializer.
    """

    def __init__(self, num_features: int, num_fields: int, embedding_dim: int, combiner: str = "sum",
                 l2: float = 0.0, init_stddev: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1 or num_fields < 1 or num_features < 1:
            raise ValueError(f"FieldEmbedding needs positive sizes, got features={num_features} "
                             f"fields={num_fields} k={embedding_dim}")
        if combiner not in ("sum", "mean"):
            raise ValueError(f"combiner must be sum or mean, got {combiner!r}")
        self.num_features = num_features
        self.num_fields = num_fields
        self.embedding_dim = embedding_dim
        self.combiner = combiner
        self.l2 = l2
        self.init_stddev = init_stddev

    def build(self, input_shape):
        self.v = self.add_weight(name="v", shape=(self.num_features, self.embedding_dim),
                                 initializer=keras.initializers.RandomNormal(stddev=self.init_stddev))
        super().build(input_shape)

    def call(self, features):
        if all_fields_dense(features, self.num_fields):
            # One feature per field: e_f = v_{id_f} x_f, the [batch, F, k] gather itself (mean = sum).
            v = lookup(self.v, features[DENSE_IDS])
            if self.l2:
                self.add_loss(_touched_l2(v, self.l2) / tf.cast(tf.shape(v)[0], tf.float32))
            return v * features[DENSE_VALUES][:, :, None]
        rows, ids, values, fields, batch = sparse_parts(features)
        v = lookup(self.v, ids)
        if self.l2:
            self.add_loss(_touched_l2(v, self.l2) / tf.cast(batch, tf.float32))
        pooled = field_sums(v * values[:, None], rows, fields, batch, self.num_fields)
        if self.combiner == "mean":
            count = field_sums(tf.ones_like(values), rows, fields, batch, self.num_fields)
            pooled = pooled / tf.maximum(count, 1.0)[:, :, None]
        return pooled

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "num_fields": self.num_fields,
                "embedding_dim": self.embedding_dim, "combiner": self.combiner, "l2": self.l2,
                "init_stddev": self.init_stddev}


class FieldValues(keras.layers.Layer):
    """Dense features: the value of each chosen field (sum over its features; 0 when absent).

    The "dense/statistical features" input of a deep model (Cheng et al., "Wide & Deep", DLRS 2016):
    ``numeric`` fields carry one feature whose value is the raw number.

    Input: sparse features. Output: ``[batch, len(fields)]``.

    Args:
      fields: field ids, in output order.
    """

    def __init__(self, fields, **kwargs):
        super().__init__(**kwargs)
        self.fields = tuple(int(f) for f in fields)
        if not self.fields:
            raise ValueError("FieldValues needs at least one field")

    def call(self, features):
        rows, _, values, fields, batch = sparse_parts(features)
        slot = tf.argmax(tf.cast(tf.equal(fields[:, None], tf.constant(self.fields, tf.int64)), tf.int32), axis=1)
        hit = 1.0 - _not_in(fields, self.fields)
        n = len(self.fields)
        out = tf.math.unsorted_segment_sum(values * hit, rows * n + slot, batch * n)
        return tf.reshape(out, tf.stack([batch, n]))

    def get_config(self):
        return {**super().get_config(), "fields": list(self.fields)}


class FieldFMInteraction(keras.layers.Layer):
    """FM second-order term over pooled field embeddings (the FM component of Guo et al., "DeepFM",
    IJCAI 2017, which shares its embeddings with the deep component).

        y = sum_{f<g} <e_f, e_g> = 1/2 sum_k [ (sum_f e_{f,k})^2 - sum_f e_{f,k}^2 ]

    With one feature per field this is Rendle's FM term; features of one multi-hot field do not
    pair with each other.

    Input: ``[batch, fields, k]``. Output: ``[batch, 1]``.
    """

    def call(self, emb):
        s = tf.reduce_sum(emb, axis=1)
        sq = tf.reduce_sum(tf.square(emb), axis=1)
        return 0.5 * tf.reduce_sum(tf.square(s) - sq, axis=1, keepdims=True)


class MLP(keras.layers.Layer):
    """Multi-layer perceptron: ``h_{l+1} = dropout(act(W_l h_l + b_l))``.

    (The deep part of Cheng et al., "Wide & Deep", DLRS 2016, and of Guo et al., "DeepFM", IJCAI 2017.)

    Input: ``[batch, d]``. Output: ``[batch, hidden_units[-1]]`` (the input when ``hidden_units`` is empty).

    Args:
      hidden_units: layer sizes.
      activation: Keras activation name.
      dropout: dropout rate after each layer (training only).
      l2: L2 on the kernels (``l2 * ||W||^2``).
      seed: dropout seed.
      compute_dtype: ``float32``, or ``bfloat16``: the layers run in bfloat16 with float32 variables
        (Keras' ``mixed_bfloat16`` policy: the matmuls take bfloat16 inputs and weights, oneDNN's
        AVX512-BF16 kernels on CPU) and the output is cast back to float32.
    """

    def __init__(self, hidden_units=(), activation: str = "relu", dropout: float = 0.0, l2: float = 0.0,
                 seed: int | None = None, compute_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if compute_dtype not in MLP_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(MLP_DTYPES)}, got {compute_dtype!r}")
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.activation = activation
        self.dropout = dropout
        self.l2 = l2
        self.seed = seed
        self.compute_dtype_name = compute_dtype
        policy = MLP_DTYPES[compute_dtype]
        reg = keras.regularizers.L2(l2) if l2 else None
        self.dense = [keras.layers.Dense(u, activation=activation, kernel_regularizer=reg, name=f"dense_{i}",
                                         dtype=policy)
                      for i, u in enumerate(self.hidden_units)]
        self.drop = [keras.layers.Dropout(dropout, seed=None if seed is None else seed + i, dtype=policy)
                     for i in range(len(self.hidden_units))] if dropout else []

    def call(self, x, training=False):
        for i, layer in enumerate(self.dense):
            x = layer(x)
            if self.drop:
                x = self.drop[i](x, training=training)
        return tf.cast(x, tf.float32)

    def get_config(self):
        return {**super().get_config(), "hidden_units": list(self.hidden_units), "activation": self.activation,
                "dropout": self.dropout, "l2": self.l2, "seed": self.seed,
                "compute_dtype": self.compute_dtype_name}


# MLP compute dtypes -> the Keras dtype policy of its layers (None: the global policy, float32).
MLP_DTYPES = {"float32": None, "bfloat16": "mixed_bfloat16"}


class TaskTower(keras.layers.Layer):
    """Per-task tower of a multi-task model: an MLP and a one-unit logit layer.

        logit = w^T MLP(h) + b

    (The task-specific towers of hard parameter sharing, Caruana, "Multitask Learning", 1997;
    Ma et al., "Entire Space Multi-Task Model", SIGIR 2018.)

    Input: ``[batch, d]``. Output: ``[batch, 1]`` logits.

    Args:
      hidden_units, activation, dropout, l2, seed: of the tower's MLP (``l2`` also on the logit kernel).
    """

    def __init__(self, hidden_units=(), activation: str = "relu", dropout: float = 0.0, l2: float = 0.0,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.mlp = MLP(hidden_units, activation, dropout, l2, seed, name="mlp")
        self.logit = keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
                                        name="logit")

    def call(self, x, training=False):
        return self.logit(self.mlp(x, training=training))

    def get_config(self):
        c = self.mlp.get_config()
        return {**super().get_config(), **{k: c[k] for k in ("hidden_units", "activation", "dropout", "l2", "seed")}}


class MixtureOfExperts(keras.layers.Layer):
    """Multi-gate mixture of experts (Ma et al., "Modeling Task Relationships in Multi-task Learning
    with Multi-gate Mixture-of-Experts", KDD 2018).

        f_t(x) = sum_{e=1..E} g_t(x)_e * expert_e(x),    g_t(x) = softmax(W_t x)

    E expert MLPs share the input; each of the T tasks has its own gate (a bias-free linear map to E
    logits, as in the paper), so tasks can weight the experts differently instead of sharing one
    bottom. Task t's tower then reads ``f_t(x)``.

    Input: ``[batch, d]``. Output: ``[batch, num_tasks, expert_units[-1]]`` (task t's mixture at
    ``[:, t]``).

    Args:
      num_tasks: T, the number of gates.
      num_experts: E.
      expert_units: hidden layer sizes of each expert MLP (not empty).
      activation, dropout, l2, seed: of the expert MLPs (``l2`` also on the gate kernels; expert e
        draws dropout from ``seed + 100 * e``).
    """

    def __init__(self, num_tasks: int, num_experts: int, expert_units=(64,), activation: str = "relu",
                 dropout: float = 0.0, l2: float = 0.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_tasks < 1 or num_experts < 1:
            raise ValueError(f"MixtureOfExperts needs tasks and experts >= 1, got {num_tasks}, {num_experts}")
        if not expert_units:
            raise ValueError("MixtureOfExperts needs expert_units (an expert without layers is the identity)")
        self.num_tasks = num_tasks
        self.num_experts = num_experts
        self.expert_units = tuple(int(u) for u in expert_units)
        self.activation = activation
        self.dropout = dropout
        self.l2 = l2
        self.seed = seed
        reg = keras.regularizers.L2(l2) if l2 else None
        self.experts = [MLP(self.expert_units, activation, dropout, l2, None if seed is None else seed + 100 * e,
                            name=f"expert_{e}") for e in range(num_experts)]
        self.gates = [keras.layers.Dense(num_experts, use_bias=False, kernel_regularizer=reg, name=f"gate_{t}")
                      for t in range(num_tasks)]

    def gate_weights(self, x):
        """Softmax gate weights ``[batch, num_tasks, num_experts]``."""
        return tf.stack([tf.nn.softmax(g(x), axis=-1) for g in self.gates], axis=1)

    def call(self, x, training=False):
        experts = tf.stack([e(x, training=training) for e in self.experts], axis=1)  # [B, E, u]
        return tf.einsum("bte,beu->btu", self.gate_weights(x), experts)

    def get_config(self):
        return {**super().get_config(), "num_tasks": self.num_tasks, "num_experts": self.num_experts,
                "expert_units": list(self.expert_units), "activation": self.activation, "dropout": self.dropout,
                "l2": self.l2, "seed": self.seed}
