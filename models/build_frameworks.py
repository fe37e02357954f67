"""Regenerate models/frameworks/: tiny random transformers exported by TensorFlow's own tools.

TensorFlow is too heavy to install in CI, so the models are built once with this script and
committed (each is under 200 KB). Run it with a Python whose environment has the exporters (a
separate venv, outside the repository):

    python3 -m venv /tmp/tf-venv
    /tmp/tf-venv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 keras==3.15.1 \
        "transformers==4.57.*" tf-keras==2.21.0 onnx onnxruntime
    /tmp/tf-venv/bin/python models/build_frameworks.py

It writes, all with random weights (no download), hidden 32, 4 heads, 2 layers, FFN 64, vocab 256:

    tf2onnx-gpt2.onnx   transformers' TFGPT2LMHeadModel through tf2onnx.convert.from_function,
                        opset 17, int32 input_ids [batch, sequence] (both dynamic)
    keras-gpt.onnx      a GPT written with keras.layers (token and position Embedding, causal
                        MultiHeadAttention, LayerNormalization, Dense FFN, untied LM head), exported
                        by Keras 3's model.export(format="onnx") on the TensorFlow backend
    keras-bert.onnx     a BERT-style encoder in keras.layers (post-norm blocks, no mask, a Dense
                        head over the vocabulary), exported the same way

Every weight gets a small random shift after it is built, so biases and LayerNorm betas are not zero
(tf2onnx folds an Add of zeros away, and a trained model's export has them).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

OUT = Path(__file__).resolve().parent / "frameworks"
HIDDEN, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 32, 4, 2, 64, 256, 64


def perturb(variables, seed: int) -> None:
    """Fresh models have zero biases and LayerNorm betas, which tf2onnx folds away (an Add of zeros is
    dropped, beta - x becomes Neg(x)): a small random shift on every weight keeps the graph in the
    form a trained model exports to."""
    import numpy as np
    rng = np.random.default_rng(seed)
    for v in variables:
        value = np.asarray(v.numpy())
        v.assign((value + rng.normal(0.0, 0.02, value.shape)).astype(value.dtype))


def tf2onnx_gpt2(path: Path) -> None:
    import tensorflow as tf
    import tf2onnx
    import transformers
    tf.random.set_seed(0)
    config = transformers.GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_inner=FFN,
                                     vocab_size=VOCAB, n_positions=POSITIONS)
    model = transformers.TFGPT2LMHeadModel(config)
    model(tf.constant([[1, 2, 3]], dtype=tf.int32))  # builds the weights
    perturb(model.weights, 0)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="input_ids")])
    def logits(input_ids):
        return model(input_ids=input_ids).logits

    tf2onnx.convert.from_function(logits, input_signature=logits.input_signature, opset=17,
                                  output_path=str(path))


def keras_block(keras, x, causal: bool, pre_norm: bool, index: int):
    layers = keras.layers
    attention = layers.MultiHeadAttention(num_heads=HEADS, key_dim=HIDDEN // HEADS, name=f"attention_{index}")
    norm1 = layers.LayerNormalization(epsilon=1e-5, name=f"norm1_{index}")
    norm2 = layers.LayerNormalization(epsilon=1e-5, name=f"norm2_{index}")
    # exact gelu is written with Erfc, which tf2onnx cannot convert (it stays a TensorFlow op that
    # ONNX Runtime refuses): the tanh approximation converts
    up = layers.Dense(FFN, activation=lambda v: keras.activations.gelu(v, approximate=True), name=f"up_{index}")
    down = layers.Dense(HIDDEN, name=f"down_{index}")
    if pre_norm:
        h = norm1(x)
        x = x + attention(h, h, use_causal_mask=causal)
        return x + down(up(norm2(x)))
    x = norm1(x + attention(x, x, use_causal_mask=causal))
    return norm2(x + down(up(x)))


class PositionEmbedding:
    """Adds a learned table row per position, read with arange over the sequence."""

    def __new__(cls, keras):
        class Positions(keras.layers.Layer):
            def build(self, input_shape):
                self.table = keras.layers.Embedding(POSITIONS, HIDDEN, name="positions")
                self.table.build((None,))

            def call(self, ids):
                length = keras.ops.shape(ids)[1]
                return self.table(keras.ops.arange(length))[None]
        return Positions(name="position_embedding")


def keras_model(causal: bool, pre_norm: bool, name: str):
    import keras
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(None,), dtype="int32", name="input_ids")
    x = keras.layers.Embedding(VOCAB, HIDDEN, name="tokens")(ids) + PositionEmbedding(keras)(ids)
    if not pre_norm:
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="embedding_norm")(x)
    for i in range(LAYERS):
        x = keras_block(keras, x, causal, pre_norm, i)
    if pre_norm:
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(VOCAB, name="lm_head")(x)
    return keras.Model(ids, logits, name=name)


def keras_export(model, path: Path) -> None:
    import numpy as np
    model(np.array([[1, 2, 3]], dtype="int32"))  # Keras exports only a model that has run
    perturb(model.weights, 1)
    model.export(str(path), format="onnx")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    tf2onnx_gpt2(OUT / "tf2onnx-gpt2.onnx")
    keras_export(keras_model(causal=True, pre_norm=True, name="gpt"), OUT / "keras-gpt.onnx")
    keras_export(keras_model(causal=False, pre_norm=False, name="bert"), OUT / "keras-bert.onnx")
    for p in sorted(OUT.glob("*.onnx")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
