"""Where the kernels launch: Triton launches on the current CUDA device and its current stream."""
import contextlib

import torch


def on_device(device: torch.device):
    """Make `device` the current one for the launches inside (tensors on cuda:1 while cuda:0 is
    current, as on DDP's other ranks or in a user's call); nothing to do off CUDA (the Triton
    interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
