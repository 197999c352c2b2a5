"""Eager PyTorch form of MLLA's linear attention: the ground truth every kernel is tested against.

Steps 2-4 of DESIGN.md, per head h of dimension d = C / num_heads:
    q = phi(qk[..., :C]), k = phi(qk[..., C:]), phi(t) = ELU(t) + 1
    z_n = 1 / (q_n . mean_m k_m + 1e-6)
    KV = (1/N) sum_m rope(k)_m^T v_m
    out_n = (rope(q)_n . KV) * z_n
Exact in float64; lower precisions compute in float32 and return the input dtype.
"""
import torch
import torch.nn.functional as F

from .rope import apply_rope

NORMALIZER_EPS = 1e-6


def feature_map(t: torch.Tensor) -> torch.Tensor:
    return F.elu(t) + 1.0


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def linear_attention_reference(qk: torch.Tensor, v: torch.Tensor, hw_shape, num_heads: int) -> torch.Tensor:
    """(B, N, 2C) qk projection and (B, N, C) values -> (B, N, C), without LePE."""
    out_dtype = v.dtype
    compute_dtype = torch.float64 if qk.dtype == torch.float64 else torch.float32
    b, n, c = v.shape
    qk = qk.to(compute_dtype)
    v = v.to(compute_dtype)
    q = feature_map(qk[..., :c])
    k = feature_map(qk[..., c:])
    q_rope = _split_heads(apply_rope(q, hw_shape), num_heads)
    k_rope = _split_heads(apply_rope(k, hw_shape), num_heads)
    q, k, v = (_split_heads(t, num_heads) for t in (q, k, v))

    k_mean = k.mean(dim=-2, keepdim=True)
    z = 1.0 / (q @ k_mean.transpose(-2, -1) + NORMALIZER_EPS)
    kv = (k_rope.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
    out = (q_rope @ kv) * z
    return out.transpose(1, 2).reshape(b, n, c).to(out_dtype)
