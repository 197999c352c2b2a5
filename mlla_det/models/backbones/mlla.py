"""MLLA: Mamba-Like Linear Attention backbone ("Demystify Mamba in Vision", Han et al., NeurIPS 2024).

Detection form of the model: four stages of MLLA blocks on a convolutional stem, with a LayerNorm
on each returned stage output. Module and parameter names follow the paper's checkpoints, so its
ImageNet and Mask R-CNN weights load as they are. The attention math runs through
`mlla_kernels.linear_attention` and the four depthwise 3x3 convolutions of each block through
`mlla_kernels.dwconv.dwconv3x3_tokens` (token layout, epilogue fused); `attn_impl` / `conv_impl`
choose eager PyTorch or the fused Triton kernels for each. The convolutions stay nn.Conv2d
modules, so the state dict is the paper's.
"""
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.runner.checkpoint import CheckpointLoader

from mmdet.registry import MODELS
from mlla_kernels import IMPLS as ATTN_IMPLS
from mlla_kernels import linear_attention
from mlla_kernels.dwconv import IMPLS as CONV_IMPLS
from mlla_kernels.dwconv import dwconv3x3_tokens

HwShape = Tuple[int, int]
# The attention's key logit for tokens outside a canvas's image region: phi(-3e4) = exp(-3e4) = 0.
MASKED_KEY_LOGIT = -3.0e4


def tokens_to_map(x: torch.Tensor, hw_shape: HwShape) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, *hw_shape)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


def keep_tokens(x: torch.Tensor, token_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x with the tokens outside a canvas's image region set to zero (x itself without a mask)."""
    return x if token_mask is None else torch.where(token_mask, x, 0)


def draw_residual_scales(keep_probs: torch.Tensor, batch: int) -> Tuple[torch.Tensor, ...]:
    """Stochastic depth's per-sample factors for len(keep_probs) residual branches at once: each
    (batch, 1, 1), 1/p with probability p (the branch kept, rescaled) and 0 otherwise, p being the
    branch's keep probability; in float32, or keep_probs' dtype if wider. The draw of timm's and
    mmcv's DropPath, floor(p + U) / p, made for every branch in one go instead of five launches
    per branch."""
    uniform = torch.rand(keep_probs.shape[0], batch, device=keep_probs.device, dtype=torch.float32)
    scales = (keep_probs[:, None] + uniform).floor_().div_(keep_probs[:, None])
    return scales.view(-1, batch, 1, 1).unbind(0)


def add_residual(shortcut: torch.Tensor, branch: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """shortcut + branch, the branch multiplied by its stochastic-depth factor when given."""
    return shortcut + branch if scale is None else shortcut + branch * scale


def canvas_side(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def canvas_region(hw_shape: HwShape, canvas_hw: HwShape, device) -> torch.Tensor:
    """(Hc, Wc) bool, true on the (H, W) region at the canvas's top left. A tensor, not a shape,
    so that one CUDA graph per canvas serves every input size that fits in it."""
    (height, width), (canvas_h, canvas_w) = hw_shape, canvas_hw
    return (torch.arange(canvas_h, device=device)[:, None] < height) & (torch.arange(canvas_w, device=device) < width)


def tokens_to_canvas(x: torch.Tensor, hw_shape: HwShape, canvas_hw: HwShape) -> torch.Tensor:
    """(B, H*W, C) -> (B, Hc*Wc, C): the map at the top left, zeros around it. A new contiguous
    tensor, never a view: the compiled blocks guard on an input's strides and on its base's, and
    the downsampling layers hand over transposed maps."""
    (height, width), (canvas_h, canvas_w) = hw_shape, canvas_hw
    b, _, c = x.shape
    canvas = x.new_zeros(b, canvas_h * canvas_w, c)
    canvas.view(b, canvas_h, canvas_w, c)[:, :height, :width] = x.reshape(b, height, width, c)
    return canvas


def tokens_from_canvas(x: torch.Tensor, hw_shape: HwShape, canvas_hw: HwShape) -> torch.Tensor:
    """Inverse of tokens_to_canvas; always a new tensor (a CUDA graph's output memory is reused
    by its next replay)."""
    (height, width), (canvas_h, canvas_w) = hw_shape, canvas_hw
    b, _, c = x.shape
    return x.reshape(b, canvas_h, canvas_w, c)[:, :height, :width].reshape(b, height * width, c).clone()


def depthwise_conv3x3(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, 3, padding=1, groups=dim)


def depthwise_tokens(conv: nn.Conv2d, x: torch.Tensor, hw_shape: HwShape, epilogue: str, impl: str,
                     addend: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`conv` applied to tokens (B, N, C) with its epilogue: the block's CPE ("residual"), DWC
    ("silu") and LePE ("add" into the attention output)."""
    return dwconv3x3_tokens(x, conv.weight, conv.bias, hw_shape, epilogue=epilogue, addend=addend, impl=impl)


class ConvNormAct(nn.Module):
    """Conv2d, optional BatchNorm, optional ReLU; named `conv` / `norm` as in the checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, groups: int = 1, bias: bool = True, norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LinearAttention(nn.Module):
    """Linear attention with 2-D RoPE and LePE; q and k from one projection, v is the input."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: str = "auto",
                 conv_impl: str = "auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.conv_impl = conv_impl
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.lepe = depthwise_conv3x3(dim)
        # The paper's checkpoints carry a fixed 56x56 RoPE table (`rope.rotations`) that detection
        # never uses: angles are computed for the actual (H, W). Drop it when loading.
        self._register_load_state_dict_pre_hook(_drop_rope_table)

    def forward(self, x: torch.Tensor, hw_shape: HwShape, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, C); with a token mask (canvas mode) x must already be zero outside it."""
        qk = self.qk(x)
        if token_mask is not None:
            # Keys outside the image get phi(k) = ELU(t) + 1 = exp(t) = 0 (t = -3e4 underflows in
            # every dtype, phi'(t) too), and their values are zero: they add nothing to the key-value
            # state or the key sum. What is left of the canvas is the 1/N of both, which cancels but
            # for the normalizer's eps (relative change ~eps * (N_canvas - N) / (q . sum k)).
            key_channel = torch.arange(qk.shape[-1], device=qk.device) >= self.dim
            qk = torch.where(token_mask | ~key_channel, qk, MASKED_KEY_LOGIT)
        out = linear_attention(qk, x, hw_shape, self.num_heads, impl=self.attn_impl)
        return depthwise_tokens(self.lepe, x, hw_shape, "add", self.conv_impl, addend=out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, attn_impl={self.attn_impl!r}, "
                f"conv_impl={self.conv_impl!r}")


def _drop_rope_table(state_dict, prefix, *args, **kwargs):
    state_dict.pop(prefix + "rope.rotations", None)


class MLLABlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, drop_path: float = 0.0, attn_impl: str = "auto", conv_impl: str = "auto"):
        super().__init__()
        self.conv_impl = conv_impl
        self.cpe1 = depthwise_conv3x3(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = depthwise_conv3x3(dim)
        self.act = nn.SiLU()
        self.attn = LinearAttention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl,
                                    conv_impl=conv_impl)
        self.out_proj = nn.Linear(dim, dim)
        # Stochastic depth of both residual branches (the paper's DropPath): MLLA draws the
        # factors of all blocks at once (draw_residual_scales); a block called alone draws its own.
        self.drop_prob = float(drop_path)
        self.cpe2 = depthwise_conv3x3(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, hw_shape: HwShape, token_mask: Optional[torch.Tensor] = None,
                residual_scales: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """token_mask (canvas mode, see MLLAStage): every spatial step (the 3x3 convolutions and
        the attention) sees zeros outside the image region, as the plain model sees its padding;
        the per-token steps leave values there that nothing reads. residual_scales: the two
        branches' stochastic-depth factors (draw_residual_scales), drawn here in training if not given."""
        if residual_scales is None and self.training and self.drop_prob > 0.0:
            residual_scales = draw_residual_scales(x.new_full((2,), 1.0 - self.drop_prob, dtype=torch.float32),
                                                   x.shape[0])
        attn_scale, mlp_scale = residual_scales if residual_scales is not None else (None, None)
        x = depthwise_tokens(self.cpe1, keep_tokens(x, token_mask), hw_shape, "residual", self.conv_impl)
        shortcut = x
        x = self.norm1(x)
        gate = self.act(self.act_proj(x))
        x = depthwise_tokens(self.dwc, keep_tokens(self.in_proj(x), token_mask), hw_shape, "silu", self.conv_impl)
        x = self.attn(keep_tokens(x, token_mask), hw_shape, token_mask)
        x = add_residual(shortcut, self.out_proj(x * gate), attn_scale)
        x = depthwise_tokens(self.cpe2, keep_tokens(x, token_mask), hw_shape, "residual", self.conv_impl)
        return add_residual(x, self.mlp(self.norm2(x)), mlp_scale)


class PatchMerging(nn.Module):
    """Stride-2 downsampling: 1x1 expand, depthwise 3x3/2, 1x1 project + BN; odd sizes padded."""

    def __init__(self, dim: int, ratio: float = 4.0):
        super().__init__()
        out_dim = 2 * dim
        hidden = int(out_dim * ratio)
        self.conv = nn.Sequential(
            ConvNormAct(dim, hidden, kernel_size=1, norm=False),
            ConvNormAct(hidden, hidden, kernel_size=3, stride=2, padding=1, groups=hidden, norm=False),
            ConvNormAct(hidden, out_dim, kernel_size=1, act=False),
        )

    def forward(self, x: torch.Tensor, hw_shape: HwShape) -> Tuple[torch.Tensor, HwShape]:
        height, width = hw_shape
        x = tokens_to_map(x, hw_shape)
        if height % 2 or width % 2:
            x = F.pad(x, (0, width % 2, 0, height % 2))
        x = self.conv(x)
        return map_to_tokens(x), (x.shape[2], x.shape[3])


class MLLAStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, drop_path: Sequence[float], mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, downsample: bool = True, use_checkpoint: bool = False,
                 attn_impl: str = "auto", conv_impl: str = "auto"):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            MLLABlock(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                      drop_path=drop_path[i], attn_impl=attn_impl, conv_impl=conv_impl)
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None
        # Canvas mode (MLLA.set_canvas): the blocks run on a token map whose sides are rounded up
        # to this multiple, zero-masked outside the input's region. None: on the input as it is.
        self.canvas_multiple: Optional[int] = None

    def run_blocks(self, x: torch.Tensor, hw_shape: HwShape, token_mask: Optional[torch.Tensor] = None,
                   residual_scales: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """The blocks alone; token_mask (B or 1, N, 1) bool in canvas mode; residual_scales: two
        stochastic-depth factors per block, in order (None: each block draws its own in training)."""
        for i, block in enumerate(self.blocks):
            scales = None if residual_scales is None else residual_scales[2 * i:2 * i + 2]
            if self.use_checkpoint and x.requires_grad:
                x = checkpoint.checkpoint(block, x, hw_shape, token_mask, scales, use_reentrant=False)
            else:
                x = block(x, hw_shape, token_mask, scales)
        return x

    def run_blocks_on_canvas(self, x: torch.Tensor, region: torch.Tensor,
                             residual_scales: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """The blocks on canvas tokens x (B, Hc*Wc, C), `region` (Hc, Wc) marking the input's
        tokens: the part BlockGraphsHook compiles, one CUDA graph per canvas. The canvas's sides
        come from region's shape rather than int arguments: under torch.compile(dynamic=True)
        they are then tensor sizes, which the compiler knows are at least 2."""
        canvas_hw = (region.shape[0], region.shape[1])
        return self.run_blocks(x, canvas_hw, region.reshape(1, -1, 1), residual_scales)

    def forward(self, x: torch.Tensor, hw_shape: HwShape, residual_scales: Optional[Sequence[torch.Tensor]] = None):
        """Returns the stage output (before downsampling) and the next stage's input."""
        if self.canvas_multiple is None:
            x = self.run_blocks(x, hw_shape, residual_scales=residual_scales)
        else:
            hw_shape = tuple(hw_shape)
            canvas_hw = tuple(canvas_side(size, self.canvas_multiple) for size in hw_shape)
            region = canvas_region(hw_shape, canvas_hw, x.device)
            x = tokens_to_canvas(x, hw_shape, canvas_hw)
            # Under torch.compile(dynamic=True) only the canvas's sides may vary. Batch and channels
            # stay fixed, so that no side is tied to a channel count it happens to equal at the
            # first call (Dynamo gives equal sizes one symbol) and then specialised with it.
            torch._dynamo.mark_static(x, 0)
            torch._dynamo.mark_static(x, 2)
            x = self.run_blocks_on_canvas(x, region, residual_scales)
            x = tokens_from_canvas(x, hw_shape, canvas_hw)
        if self.downsample is None:
            return x, hw_shape, x, hw_shape
        x_down, down_hw_shape = self.downsample(x, hw_shape)
        return x, hw_shape, x_down, down_hw_shape


class Stem(nn.Module):
    """Stride-4 convolutional stem; pads the image right/bottom to a multiple of `patch_size`."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        half = embed_dim // 2
        self.conv1 = ConvNormAct(in_chans, half, kernel_size=3, stride=2, padding=1, bias=False)
        self.conv2 = nn.Sequential(
            ConvNormAct(half, half, kernel_size=3, padding=1, bias=False),
            ConvNormAct(half, half, kernel_size=3, padding=1, bias=False, act=False),
        )
        self.conv3 = nn.Sequential(
            ConvNormAct(half, embed_dim * 4, kernel_size=3, stride=2, padding=1, bias=False),
            ConvNormAct(embed_dim * 4, embed_dim, kernel_size=1, bias=False, act=False),
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, HwShape]:
        height, width = x.shape[-2:]
        pad_w = -width % self.patch_size
        pad_h = -height % self.patch_size
        if pad_w or pad_h:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.conv1(x)
        x = self.conv2(x) + x
        x = self.conv3(x)
        return map_to_tokens(x), (x.shape[2], x.shape[3])


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> Tuple[dict, dict]:
    """Map a published MLLA checkpoint (classification or detection) onto the backbone.

    Returns the filtered state dict and {skipped key: reason}.
    """
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {key[len("backbone."):]: value for key, value in state_dict.items()
                      if key.startswith("backbone.")}
    own_keys = set(model.state_dict().keys())
    kept, skipped = {}, {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            skipped[key] = "classification head"
        elif key.startswith("norm."):
            skipped[key] = "classifier's final norm (detection normalises each output stage instead)"
        elif key.endswith("attn.rope.rotations"):
            skipped[key] = "fixed 56x56 RoPE table; angles are computed for each input size"
        elif key not in own_keys:
            skipped[key] = "not a parameter of this backbone"
        else:
            kept[key] = value
    return kept, skipped


@MODELS.register_module()
class MLLA(BaseModule):
    """MLLA backbone for dense prediction.

    Args:
        embed_dim: channels of the first stage; stage i has embed_dim * 2**i.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP hidden size over the block width.
        qkv_bias: bias in the qk projection.
        drop_rate: dropout in the MLPs and after the stem.
        drop_path_rate: stochastic depth, growing linearly from 0 over all blocks.
        out_indices: stages whose (layer-normalised) outputs are returned.
        use_checkpoint: activation checkpointing per block (saves memory in training).
        attn_impl: "auto" (fused Triton kernels on CUDA, eager elsewhere), "triton" or "reference".
        conv_impl: the same choice for the blocks' depthwise 3x3 convolutions (CPE, DWC, LePE);
            "reference" runs nn.Conv2d's weights through F.conv2d. The fused convolutions cut the
            GPU time of an MLLA-T training step (H200, 2x800x1280, bf16: 42.7 -> 30.7 ms) and its
            memory; launched from Python step by step, where the host's launch cost sets the pace,
            they win under bf16 autocast and in Mask R-CNN training but can lose in an fp32
            backbone-only step (benchmarks/README.md has both).
        init_cfg: mmengine init config; `dict(type='Pretrained', checkpoint=PATH)` loads an MLLA
            ImageNet checkpoint (weights under `model`) or a detection checkpoint.
        img_size, patch_size, in_chans, num_classes, qk_scale: the paper's configs pass these;
            only in_chans and patch_size matter for detection.
    """

    def __init__(self, embed_dim: int = 64, depths: Sequence[int] = (2, 4, 8, 4),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.1, out_indices: Sequence[int] = (0, 1, 2, 3),
                 use_checkpoint: bool = False, attn_impl: str = "auto", conv_impl: str = "auto", init_cfg: Optional[dict] = None,
                 img_size=224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000, qk_scale=None,
                 **kwargs):
        super().__init__(init_cfg=init_cfg)
        if kwargs:
            MMLogger.get_current_instance().warning(f"MLLA ignores unknown arguments {sorted(kwargs)}")
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have one entry per stage")
        num_stages = len(depths)
        if any(not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must lie in [0, {num_stages})")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self.out_indices = tuple(out_indices)
        self.num_features = [int(embed_dim * 2 ** i) for i in range(num_stages)]

        self.patch_embed = Stem(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            start = sum(depths[:i])
            self.layers.append(MLLAStage(
                self.num_features[i], depth, heads, drop_path[start:start + depth], mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, drop=drop_rate, downsample=i < num_stages - 1,
                use_checkpoint=use_checkpoint, attn_impl=attn_impl, conv_impl=conv_impl))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        # Keep probabilities of every block's two residual branches, in order: the factors of all
        # of them are drawn in one go per training forward (not in the state dict).
        self.register_buffer("residual_keep_probs", torch.tensor(
            [1.0 - rate for rate in drop_path for _ in range(2)], dtype=torch.float32), persistent=False)
        self.stochastic_depth = drop_path_rate > 0.0

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def init_weights(self) -> None:
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get("type") == "Pretrained"):
            super().init_weights()
            return
        path = self.init_cfg.get("checkpoint")
        if not path:
            raise ValueError("init_cfg type 'Pretrained' needs a `checkpoint` path")
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"MLLA pretrained checkpoint not found at {path!r} (resolved: {os.path.abspath(path)}). "
                f"Put the paper's ImageNet-1K weights there (e.g. MLLA_T.pth), or set the backbone's "
                f"init_cfg=None to train from scratch.")
        logger = MMLogger.get_current_instance()
        ckpt = CheckpointLoader.load_checkpoint(path, map_location="cpu", logger=logger)
        state_dict = ckpt.get("model", ckpt.get("state_dict", ckpt))
        state_dict, skipped = checkpoint_filter_fn(state_dict, self)
        for key, reason in skipped.items():
            logger.info(f"MLLA: skipped checkpoint key {key}: {reason}")
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if missing:
            logger.warning(f"MLLA: {len(missing)} backbone keys not in {path} (left at their "
                           f"initialisation): {missing}")
        logger.info(f"MLLA: loaded {len(state_dict)} tensors from {path}, skipped {len(skipped)}")
        self._is_init = True

    def set_canvas(self, multiple: Optional[int]) -> None:
        """Run every stage's blocks on a canvas: the token map zero-extended at the bottom and
        right until the image it stands for has sides that are multiples of `multiple` pixels
        (None: off, the default). Outputs stay those of the input's own size, equal to the plain
        model's up to rounding (the canvas changes only the order of the attention's sums and its
        normalizer's eps by ~1e-7 relative; tests/test_canvas.py). What it is for: the blocks then
        meet a bounded set of shapes, at most ceil(1344 / multiple)^2 canvases for sides of up to
        1,344 padded pixels (121 for 128), so that compiled CUDA graphs of them are recorded once per canvas and
        replayed for every image size inside it (BlockGraphsHook). Eager, it only adds work."""
        if multiple is None:
            for stage in self.layers:
                stage.canvas_multiple = None
            return
        coarsest_stride = self.patch_embed.patch_size * 2 ** (len(self.layers) - 1)
        if not isinstance(multiple, int) or multiple <= 0 or multiple % coarsest_stride:
            raise ValueError(f"the canvas multiple must be a positive multiple of the last stage's "
                             f"stride {coarsest_stride} (pixels), got {multiple!r}")
        for i, stage in enumerate(self.layers):
            stage.canvas_multiple = multiple // (self.patch_embed.patch_size * 2 ** i)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if x.dim() != 4:
            raise ValueError(f"MLLA expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        x, hw_shape = self.patch_embed(x)
        x = self.pos_drop(x)
        residual_scales = None
        if self.training and self.stochastic_depth:
            residual_scales = draw_residual_scales(self.residual_keep_probs, x.shape[0])
        outs = []
        first = 0
        for i, stage in enumerate(self.layers):
            stage_scales = None
            if residual_scales is not None:
                stage_scales = residual_scales[first:first + 2 * len(stage.blocks)]
            first += 2 * len(stage.blocks)
            out, out_hw_shape, x, hw_shape = stage(x, hw_shape, stage_scales)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(tokens_to_map(out, out_hw_shape).contiguous())
        return tuple(outs)
