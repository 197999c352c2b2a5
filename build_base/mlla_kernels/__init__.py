"""Fused kernels for MLLA's linear attention. Depends on torch and triton only."""
from .linear_attention import IMPLS, check_inputs, linear_attention
from .reference import linear_attention_reference
from .rope import apply_rope, rope_angles

__all__ = ["IMPLS", "apply_rope", "check_inputs", "linear_attention", "linear_attention_reference", "rope_angles"]
