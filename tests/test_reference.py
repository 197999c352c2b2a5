"""The eager reference against the paper's float64 golden data and against first principles."""
import math
import os

import pytest
import torch

from mlla_kernels import apply_rope, linear_attention, linear_attention_reference, rope_angles


def rel_err(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def golden_cases(reference_dir):
    return torch.load(os.path.join(reference_dir, "linear_attention_core.pt"), weights_only=False)


def test_golden_linear_attention_forward_and_gradients(golden_cases):
    assert len(golden_cases) >= 5
    for case in golden_cases:
        qk = case["qk"].clone().requires_grad_()
        v = case["v"].clone().requires_grad_()
        out = linear_attention(qk, v, (case["h"], case["w"]), case["heads"], impl="reference")
        out.backward(case["grad_out"])
        assert rel_err(out, case["out"]) < 1e-10
        assert rel_err(qk.grad, case["grad_qk"]) < 1e-10
        assert rel_err(v.grad, case["grad_v"]) < 1e-10


def test_rope_angles_follow_rows_then_columns():
    h, w, c = 3, 5, 16
    angles = rope_angles((h, w), c, torch.float64)
    k = c // 4
    theta = torch.tensor([10000.0 ** (-i / k) for i in range(k)], dtype=torch.float64)
    for n in range(h * w):
        r, s = divmod(n, w)
        torch.testing.assert_close(angles[n, :k], r * theta)
        torch.testing.assert_close(angles[n, k:], s * theta)


def test_apply_rope_rotates_each_pair():
    h, w, c = 4, 3, 8
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    y = apply_rope(x, (h, w))
    angles = rope_angles((h, w), c, torch.float64)
    for j in range(c // 2):
        a, b = x[..., 2 * j], x[..., 2 * j + 1]
        cos, sin = angles[:, j].cos(), angles[:, j].sin()
        torch.testing.assert_close(y[..., 2 * j], a * cos - b * sin)
        torch.testing.assert_close(y[..., 2 * j + 1], b * cos + a * sin)
    # a rotation keeps each pair's length
    torch.testing.assert_close(y.reshape(2, h * w, -1, 2).norm(dim=-1), x.reshape(2, h * w, -1, 2).norm(dim=-1))


def test_reference_matches_per_token_loop():
    """The matrix form against the definition written token by token."""
    torch.manual_seed(0)
    b, h, w, c, heads = 1, 3, 4, 8, 2
    n, d = h * w, c // heads
    qk = torch.randn(b, n, 2 * c, dtype=torch.float64)
    v = torch.randn(b, n, c, dtype=torch.float64)
    out = linear_attention_reference(qk, v, (h, w), heads)
    phi = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
    q, k = phi(qk[0, :, :c]), phi(qk[0, :, c:])
    rq, rk = apply_rope(q, (h, w)), apply_rope(k, (h, w))
    expected = torch.empty(n, c, dtype=torch.float64)
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        k_bar = k[:, sl].mean(0)
        kv = sum(torch.outer(rk[m, sl], v[0, m, sl]) for m in range(n)) / n
        for i in range(n):
            z = 1.0 / (q[i, sl] @ k_bar + 1e-6)
            expected[i, sl] = (rq[i, sl] @ kv) * z
    torch.testing.assert_close(out[0], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_keeps_the_input_dtype(dtype):
    qk = torch.randn(2, 12, 16).to(dtype)
    v = torch.randn(2, 12, 8).to(dtype)
    out = linear_attention_reference(qk, v, (3, 4), 2)
    assert out.dtype == dtype and out.shape == v.shape
    ref = linear_attention_reference(qk.double(), v.double(), (3, 4), 2)
    assert rel_err(out, ref) < {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]


@pytest.mark.parametrize("qk_shape, v_shape, hw, heads, match", [
    ((2, 12, 16), (2, 12, 8), (3, 5), 2, "H\\*W = 15"),
    ((2, 12, 15), (2, 12, 8), (3, 4), 2, "qk must be"),
    ((2, 12, 24), (2, 12, 12), (3, 4), 5, "cannot be split"),
    ((12, 16), (12, 8), (3, 4), 2, "expected qk of shape"),
    ((0, 12, 16), (0, 12, 8), (3, 4), 2, "at least one"),
    ((2, 0, 16), (2, 0, 8), (0, 4), 2, "at least one"),
    ((2, 12, 12), (2, 12, 6), (3, 4), 2, "multiple of 4"),
])
def test_bad_shapes_raise_clear_errors(qk_shape, v_shape, hw, heads, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(torch.randn(qk_shape), torch.randn(v_shape), hw, heads, impl="reference")


def test_bad_dtypes_and_impl_raise_clear_errors():
    qk, v = torch.randn(1, 12, 16), torch.randn(1, 12, 8)
    with pytest.raises(TypeError, match="share a dtype"):
        linear_attention(qk, v.double(), (3, 4), 2)
    with pytest.raises(TypeError, match="floating point"):
        linear_attention(qk.long(), v.long(), (3, 4), 2)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attention(qk, v, (3, 4), 2, impl="cuda")


def test_nan_propagates_like_the_definition():
    qk, v = torch.randn(1, 12, 16), torch.randn(1, 12, 8)
    v[0, 5, 0] = math.nan
    out = linear_attention(qk, v, (3, 4), 2, impl="reference")
    # a NaN in value channel 0 poisons column 0 of its head's KV: that output channel, everywhere
    assert out[..., 0].isnan().all() and not out[..., 1:].isnan().any()


def test_autocast_takes_mixed_inputs_in_its_dtype():
    qk, v = torch.randn(2, 12, 16), torch.randn(2, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(qk.bfloat16(), v, (3, 4), 2, impl="reference")
    assert out.dtype == torch.bfloat16
    ref = linear_attention_reference(qk.double(), v.double(), (3, 4), 2)
    assert rel_err(out, ref) < 2e-2
    with pytest.raises(TypeError, match="share a dtype"):  # outside autocast: no silent cast
        linear_attention(qk.bfloat16(), v, (3, 4), 2, impl="reference")
