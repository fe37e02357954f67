"""Subclone the real all-MiniLM-L6-v2 and measure how much of its sentence embeddings survive.

    python bench/subclone_minilm.py [--windows 128] [--sentences 300]

Calibration and held-out text are the Python standard library's docstrings (bench/corpus.py): the
first 80 % of the sentences calibrate, the last 20 % are held out. For each target size the subclone
and a randomly initialised model of the same size embed the held-out sentences (mean pooling over
the attention mask); we report (1) the mean cosine similarity with the source's embedding at the
kept hidden dimensions and (2) the Pearson correlation between the pairwise sentence-similarity
matrices of source and model, which needs no common dimensions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import corpus  # noqa: E402
from onnxgrow import modelio  # noqa: E402
from onnxgrow.subcloning import randomized, subclone_ir  # noqa: E402
from onnxgrow.verify import open_session  # noqa: E402

MINILM = ROOT / "models" / "zoo" / "minilm-ts17"


def embed(path: Path, tok: Tokenizer, sentences: list[str], batch: int = 32) -> np.ndarray:
    session = open_session(path, "cpu")
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok.encode_batch(sentences[i:i + batch])
        length = max(len(e.ids) for e in enc)
        ids = np.zeros((len(enc), length), np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(enc):
            ids[r, :len(e.ids)] = e.ids
            mask[r, :len(e.ids)] = 1
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                    "token_type_ids": np.zeros_like(ids)})[0]
        out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    return np.concatenate(out)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def similarity_correlation(a: np.ndarray, b: np.ndarray) -> float:
    def sims(x):
        x = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)
        s = x @ x.T
        return s[np.triu_indices(len(x), 1)]
    return float(np.corrcoef(sims(a), sims(b))[0, 1])


def run(windows: int = 128, held_out: int = 300, seq: int = 64, targets=((192, 3), (384, 3))) -> list[dict]:
    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    sentences = corpus.sentences()
    split = int(len(sentences) * 0.8)
    calib_ids = np.array(tok.encode(" ".join(sentences[:split]), add_special_tokens=False).ids, np.int64)
    starts = np.linspace(0, len(calib_ids) - seq, windows).astype(int)
    ids = np.stack([calib_ids[s:s + seq] for s in starts])
    test = sentences[split:][:held_out]
    source_emb = embed(MINILM / "model.onnx", tok, test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, layers in targets:
            t = time.time()
            result = subclone_ir(modelio.load(MINILM / "model.onnx"), ids, hidden=hidden, layers=layers,
                                 provider="cpu")
            seconds = time.time() - t
            sub = modelio.save(result.model, Path(tmp) / f"sub{hidden}.onnx")
            rnd = modelio.save(randomized(modelio.load(sub)), Path(tmp) / f"rnd{hidden}.onnx")
            ref = source_emb[:, result.kept_hidden]
            row = {"hidden": hidden, "layers": layers, "removed_blocks": result.removed_blocks,
                   "seconds": round(seconds, 1)}
            for name, path in (("subclone", sub), ("random", rnd)):
                emb = embed(path, tok, test)
                row[f"{name}_cosine"] = float(cosine_rows(emb, ref).mean())
                row[f"{name}_sim_corr"] = similarity_correlation(emb, source_emb)
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=300)
    args = parser.parse_args()
    rows = run(args.windows, args.sentences)
    print("| target | removed blocks | subclone cosine | random cosine | subclone sim. corr. | random sim. corr. | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']} wide / {r['layers']} layers | {r['removed_blocks']} | {r['subclone_cosine']:.3f} | "
              f"{r['random_cosine']:.3f} | {r['subclone_sim_corr']:.3f} | {r['random_sim_corr']:.3f} | {r['seconds']} s |")


if __name__ == "__main__":
    main()
