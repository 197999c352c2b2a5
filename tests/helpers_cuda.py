"""Counting the host's waits for the GPU in a test (torch.cuda's sync debug mode)."""
import warnings

import torch


def host_waits(fn, *args, **kwargs):
    """fn(*args, **kwargs)'s result and the messages of the synchronising calls it made (GPU only)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            result = fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return result, [str(w.message) for w in caught if 'synchroniz' in str(w.message).lower()]
