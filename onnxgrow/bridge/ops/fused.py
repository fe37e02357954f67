"""ONNX Runtime's fused norms and activations (com.microsoft, and its default-domain
SimplifiedLayerNormalization), as onnxruntime.transformers.optimizer writes them.

The defaults are ONNX Runtime's: the Skip and Embed norms' epsilon is 1e-12, the others' 1e-5. Like
the standard norms, these compute in float32 (see `neural`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...registry import MICROSOFT
from ..tensors import T, f32
from . import OPS

SKIP_EPSILON = 1e-12  # ONNX Runtime's default for SkipLayerNormalization and EmbedLayerNormalization


def with_stats(a, y, x, eps, centred: bool):
    """(y, mean, inv_std) cut to the node's outputs; statistics over the last axis."""
    mean = x.mean(-1, keepdim=True)
    spread = (x - mean) if centred else x
    if not centred:
        mean = torch.zeros_like(mean)  # ONNX Runtime leaves an RMS norm's mean output at zero
    inv_std = torch.rsqrt(spread.pow(2).mean(-1, keepdim=True) + eps)
    return y, mean, inv_std


def rms(x, scale, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.to(x.dtype)


@OPS.register("SimplifiedLayerNormalization")  # ONNX Runtime registers it in the default domain
@OPS.register("SimplifiedLayerNormalization", domain=MICROSOFT)
def simplified_layer_norm(dev, a, x, scale):
    x, eps = f32(x), a.get("epsilon", 1e-5)
    if a.get("axis", -1) not in (-1, x.dim() - 1):
        dims = tuple(range(a["axis"] % x.dim(), x.dim()))
        inv = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        y = x * inv * scale.to(x.dtype)
        return y if a["_nout"] == 1 else (y, inv)
    y = rms(x, scale, eps)
    if a["_nout"] == 1:
        return y
    return y, torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@OPS.register("LayerNormalization", domain=MICROSOFT)
def contrib_layer_norm(dev, a, x, scale, bias=None):
    from .neural import layer_norm
    return layer_norm(dev, a, x, scale, bias)


def skip_sum(dev, x, skip, bias):
    """input + skip (+ bias): the residual stream a Skip norm writes to its output 3."""
    s = f32(x) + f32(T(skip, dev, x))
    return s if bias is None else s + bias.to(s.dtype)


def skip_outputs(a, y, s, eps, centred):
    if a["_nout"] == 1:
        return y
    y, mean, inv_std = with_stats(a, y, s, eps, centred)
    return (y, mean, inv_std, s)[:a["_nout"]]


@OPS.register("SkipLayerNormalization", domain=MICROSOFT)
def skip_layer_norm(dev, a, x, skip, gamma, beta=None, bias=None):
    eps = a.get("epsilon", SKIP_EPSILON)
    s = skip_sum(dev, x, skip, bias)
    y = F.layer_norm(s, s.shape[-1:], gamma.to(s.dtype), beta.to(s.dtype) if beta is not None else None, eps)
    return skip_outputs(a, y, s, eps, centred=True)


@OPS.register("SkipSimplifiedLayerNormalization", domain=MICROSOFT)
def skip_simplified_layer_norm(dev, a, x, skip, gamma, bias=None):
    eps = a.get("epsilon", SKIP_EPSILON)
    s = skip_sum(dev, x, skip, bias)
    return skip_outputs(a, rms(s, gamma, eps), s, eps, centred=False)


@OPS.register("EmbedLayerNormalization", domain=MICROSOFT)
def embed_layer_norm(dev, a, ids, segment_ids, word, position, segment=None, gamma=None, beta=None,
                     mask=None, position_ids=None):
    ids = T(ids, dev).long()
    seq = ids.shape[1]
    positions = (torch.arange(seq, device=ids.device).unsqueeze(0) if position_ids is None
                 else T(position_ids, dev).long())
    s = f32(word[ids]) + f32(position[positions])
    if segment is not None and segment_ids is not None:
        s = s + f32(segment[T(segment_ids, dev).long()])
    y = F.layer_norm(s, s.shape[-1:], gamma.to(s.dtype), beta.to(s.dtype), a.get("epsilon", SKIP_EPSILON))
    # mask_index: each sequence's count of attended tokens (0 when no mask is given)
    mask_index = (T(mask, dev).to(torch.int32).sum(1, dtype=torch.int32) if mask is not None
                  else torch.zeros(ids.shape[0], dtype=torch.int32, device=ids.device))
    return (y, mask_index, s)[:a["_nout"]]


def plus_bias(x, bias):
    return x if bias is None else x + bias.to(x.dtype)


@OPS.register("FastGelu", domain=MICROSOFT)
def fast_gelu(dev, a, x, bias=None):
    x = plus_bias(x, bias)
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


@OPS.register("BiasGelu", domain=MICROSOFT)
def bias_gelu(dev, a, x, bias):
    return F.gelu(plus_bias(x, bias))


@OPS.register("Gelu", domain=MICROSOFT)
def contrib_gelu(dev, a, x):
    return F.gelu(x)


@OPS.register("QuickGelu", domain=MICROSOFT)
def quick_gelu(dev, a, x):
    return x * torch.sigmoid(a.get("alpha", 1.702) * x)


@OPS.register("BiasAdd", domain=MICROSOFT)
def bias_add(dev, a, x, bias, skip):
    return x + bias.to(x.dtype) + T(skip, dev, x)
