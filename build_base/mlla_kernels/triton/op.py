"""torch.library custom ops around the kernels, so torch.compile(fullgraph=True) sees one opaque
node (no graph break) and H, W travel as SymInts (no recompiles across image sizes).

mlla::linear_attention_fwd(qk, v, H, W, heads, deterministic) -> (out, state)
mlla::linear_attention_bwd(grad_out, qk, v, state, H, W, heads, deterministic) -> (grad_qk, grad_v)

state is the per-(batch, head) fp32 summary (sum rope(k)^T v and sum k, (B, heads, d*d + d));
autograd saves qk, v and state only.
"""
import torch

from .launch import attention_backward, attention_forward


@torch.library.custom_op("mlla::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(qk: torch.Tensor, v: torch.Tensor, height: int, width: int, num_heads: int,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(qk, v, height, width, num_heads, deterministic)


@linear_attention_fwd.register_fake
def _linear_attention_fwd_fake(qk, v, height, width, num_heads, deterministic):
    batch, num_tokens, channels = v.shape
    head_dim = channels // num_heads
    out = v.new_empty((batch, num_tokens, channels))
    state = v.new_empty((batch, num_heads, head_dim * head_dim + head_dim), dtype=torch.float32)
    return out, state


@torch.library.custom_op("mlla::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(grad_out: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                         height: int, width: int, num_heads: int,
                         deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, qk, v, state, height, width, num_heads, deterministic)


@linear_attention_bwd.register_fake
def _linear_attention_bwd_fake(grad_out, qk, v, state, height, width, num_heads, deterministic):
    return qk.new_empty(qk.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    qk, v, height, width, num_heads, deterministic = inputs
    _, state = output
    ctx.save_for_backward(qk, v, state)
    ctx.mark_non_differentiable(state)
    ctx.geometry = (height, width, num_heads, deterministic)


def _backward(ctx, grad_out, _grad_state):
    qk, v, state = ctx.saved_tensors
    if grad_out is None:  # only the state was used: nothing flows back through it
        return None, None, None, None, None, None
    grad_qk, grad_v = linear_attention_bwd(grad_out, qk, v, state, *ctx.geometry)
    return grad_qk, grad_v, None, None, None, None


linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class LinearAttentionFunction(torch.autograd.Function):
    """The same kernels for eager calls, without the custom ops' dispatcher round trips.

    A torch.library custom op costs host time on every call (about 0.4 ms per call in a cProfile
    of the H200 machine, NOTES.md v2), which at stages 2-4 is more than the kernels' own GPU
    time. Eager calls take this path; torch.compile, which needs the opaque ops, takes those.
    """

    @staticmethod
    def forward(ctx, qk, v, height, width, num_heads, deterministic):
        out, state = attention_forward(qk, v, height, width, num_heads, deterministic)
        ctx.save_for_backward(qk, v, state)
        ctx.geometry = (height, width, num_heads, deterministic)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qk, v, state = ctx.saved_tensors
        grad_qk, grad_v = attention_backward(grad_out, qk, v, state, *ctx.geometry)
        return grad_qk, grad_v, None, None, None, None
