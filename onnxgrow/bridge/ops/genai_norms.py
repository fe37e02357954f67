"""The RMSNorms ONNX Runtime's tools write (onnxruntime-genai's builder): SimplifiedLayerNormalization
(in the default domain, or com.microsoft) and com.microsoft SkipSimplifiedLayerNormalization, which
adds the skip (and bias) to the input first and returns that sum as output 3 (the residual stream).
The minimum the genai form needs to train; the norms' own helper may replace these."""

from __future__ import annotations

import torch

from ..tensors import f32
from . import OPS


def rms(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    x = f32(x)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.to(x.dtype)


@OPS.register("SimplifiedLayerNormalization")
@OPS.register("SimplifiedLayerNormalization", domain="com.microsoft")
def simplified_layer_norm(dev, a, x, scale):
    if a.get("axis", -1) not in (-1, x.dim() - 1):
        raise NotImplementedError("SimplifiedLayerNormalization over more than the last axis")
    y = rms(x, scale, a.get("epsilon", 1e-5)).to(x.dtype)
    if a["_nout"] == 1:
        return y
    inv_std = torch.rsqrt(f32(x).pow(2).mean(-1, keepdim=True) + a.get("epsilon", 1e-5))
    return (y, inv_std)[:a["_nout"]]


@OPS.register("SkipSimplifiedLayerNormalization", domain="com.microsoft")
def skip_simplified_layer_norm(dev, a, x, skip, scale, bias=None):
    total = x + skip if bias is None else x + skip + bias
    y = rms(total, scale, a.get("epsilon", 1e-5)).to(x.dtype)
    if a["_nout"] == 1:
        return y
    inv_std = torch.rsqrt(f32(total).pow(2).mean(-1, keepdim=True) + a.get("epsilon", 1e-5))
    return (y, None, inv_std, total)[:a["_nout"]]
