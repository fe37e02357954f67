"""Regenerate models/frameworks/jax-*.onnx: a tiny random Flax NNX GPT exported by jax2onnx.

JAX needs its own environment (the project's venv has no JAX); the models are committed, so only a
change to them needs this script:

    python3 -m venv /tmp/jax-venv
    /tmp/jax-venv/bin/pip install jax jaxlib flax "jax2onnx==0.17.1" onnx onnxruntime
    /tmp/jax-venv/bin/python models/build_jax.py

Tested with jax/jaxlib 0.10.2, flax 0.12.8, jax2onnx 0.17.1 (Python 3.11). The GPT: token and learned
position embeddings, 2 pre-norm blocks (LayerNorm, causal multi-head attention, GELU FFN), a final
LayerNorm and an untied LM head; hidden 64, 4 heads, FFN 256, vocab 256, 32 positions. Two forms:

    jax-gpt-static8.onnx   ids [B, 8]: dynamic batch, sequence static at 8
    jax-gpt-dynamic.onnx   ids [B, S]: dynamic batch and sequence (up to 32 positions)

Each comes with a .json of the true configuration (what `onnxgrow inspect` must say).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

HERE = Path(__file__).resolve().parent
CONFIG = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, ffn_size=256,
              vocab_size=256, max_positions=32, norm="layernorm", norm_position="pre", positional="learned",
              tied_embeddings=False, activation="gelu", parallel_residual=False)
OPSET = 23


class Block(nnx.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(hidden, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=hidden, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(hidden, rngs=rngs)
        self.up = nnx.Linear(hidden, ffn, rngs=rngs)
        self.down = nnx.Linear(ffn, hidden, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.down(nnx.gelu(self.up(self.norm2(x)), approximate=False))


class GPT(nnx.Module):
    def __init__(self, c: dict, rngs: nnx.Rngs):
        self.tokens = nnx.Embed(c["vocab_size"], c["hidden_size"], rngs=rngs)
        self.positions = nnx.Embed(c["max_positions"], c["hidden_size"], rngs=rngs)
        self.blocks = nnx.List([Block(c["hidden_size"], c["num_heads"], c["ffn_size"], rngs)
                                for _ in range(c["num_layers"])])
        self.norm = nnx.LayerNorm(c["hidden_size"], rngs=rngs)
        self.head = nnx.Linear(c["hidden_size"], c["vocab_size"], use_bias=False, rngs=rngs)

    def __call__(self, ids):
        # jax2onnx 0.17 traces jnp.arange / iota of a symbolic length (also inside nnx.make_causal_mask)
        # to a shape that no longer broadcasts with [B, S]: count the positions along the ids instead
        positions = jnp.cumsum(jnp.ones_like(ids), axis=1) - 1
        x = self.tokens(ids) + self.positions(positions)
        # causal: query position >= key position, [B, 1, S, S]
        mask = jnp.expand_dims(positions, (1, 3)) >= jnp.expand_dims(positions, (1, 2))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def export(model: GPT, shape: str, out: Path) -> None:
    from jax2onnx import to_onnx
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(shape), jnp.int32)
    to_onnx(model, [spec], model_name=out.stem, opset=OPSET, return_mode="file", output_path=str(out))


def check(out: Path, model: GPT, batch: int, seq: int) -> None:
    """ONNX Runtime's logits match JAX's on random ids."""
    import numpy as np
    import onnxruntime as ort
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (batch, seq)).astype(np.int32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids})[0]
    want = np.asarray(model(jnp.asarray(ids)))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{out.name}: ONNX Runtime and JAX differ by {err:.2g} relative"
    print(f"{out.name}: ids {ids.shape} -> logits {got.shape}, ORT vs JAX {err:.2g} relative")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "frameworks")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = GPT(CONFIG, nnx.Rngs(0))
    for name, shape, checks in [("jax-gpt-static8", "B, 8", [(1, 8), (3, 8)]),
                                ("jax-gpt-dynamic", "B, S", [(1, 5), (2, 8), (3, 17)])]:
        out = args.out / f"{name}.onnx"
        export(model, shape, out)
        for batch, seq in checks:
            check(out, model, batch, seq)
        (args.out / f"{name}.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


if __name__ == "__main__":
    main()
