"""2-D rotary position embedding of MLLA, for any (H, W).

The C channels form C/2 pairs (2j, 2j+1). With K = C/4 and theta_i = 10000^(-i/K), pair j < K
turns by row * theta_j and pair j >= K by column * theta_(j-K). Tokens are row-major: n = r*W + s.
"""
import torch

from .checks import normalize_hw_shape

ROPE_BASE = 10000


def rope_frequencies(channels: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """theta_i = base^(-i/K) for i < K = channels/4, computed as the paper's code does."""
    if channels % 4 != 0:
        raise ValueError(f"2-D RoPE needs the channel count to be a multiple of 4, got {channels}")
    k_max = channels // 4
    exponent = torch.arange(k_max, dtype=dtype, device=device) / k_max
    return 1.0 / (ROPE_BASE ** exponent)


def rope_angles(hw_shape, channels: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Angles (H*W, channels/2): the first K columns follow the row, the last K the column."""
    height, width = normalize_hw_shape(hw_shape)
    theta = rope_frequencies(channels, dtype, device)
    rows = torch.arange(height, dtype=dtype, device=device).repeat_interleave(width)
    cols = torch.arange(width, dtype=dtype, device=device).repeat(height)
    return torch.cat([rows[:, None] * theta, cols[:, None] * theta], dim=-1)


def apply_rope(x: torch.Tensor, hw_shape) -> torch.Tensor:
    """Rotate the channel pairs of x (..., H*W, C); angles in x's dtype."""
    *lead, n, c = x.shape
    angles = rope_angles(hw_shape, c, x.dtype, x.device)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.reshape(*lead, n, c // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return rotated.reshape(*lead, n, c)
