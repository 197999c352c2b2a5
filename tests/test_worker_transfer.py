"""BitmapMasks cross from dataloader workers through shared memory, unchanged."""
import pickle

import numpy as np
import pytest
import torch
from multiprocessing.reduction import ForkingPickler

import mlla_det  # noqa: F401,I001  (registers the transfer, as every entry point does)
from mmdet.structures.mask import BitmapMasks


def random_masks(rng, count=7, height=480, width=640):
    return BitmapMasks((rng.random((count, height, width)) > 0.7).astype(np.uint8), height, width)


def test_forking_pickler_sends_a_handle_and_gives_the_same_masks():
    masks = random_masks(np.random.default_rng(0))
    payload = ForkingPickler.dumps(masks)
    assert len(payload) < 10_000 < masks.masks.nbytes  # a shared-memory handle, not the 2 MB of bytes
    received = pickle.loads(payload)
    assert type(received) is BitmapMasks
    assert (received.height, received.width) == (masks.height, masks.width)
    assert received.masks.dtype == masks.masks.dtype and np.array_equal(received.masks, masks.masks)


def test_ordinary_pickling_is_unchanged():
    masks = random_masks(np.random.default_rng(1), count=3)
    assert len(pickle.dumps(masks)) > masks.masks.nbytes  # checkpoints and results files keep the bytes
    assert np.array_equal(pickle.loads(pickle.dumps(masks)).masks, masks.masks)


@pytest.mark.parametrize("masks", [BitmapMasks([], 20, 30), BitmapMasks(np.ones((2, 5, 9), dtype=bool), 5, 9)])
def test_empty_and_boolean_masks(masks):
    received = pickle.loads(ForkingPickler.dumps(masks))
    assert received.masks.shape == masks.masks.shape and received.masks.dtype == masks.masks.dtype
    assert np.array_equal(received.masks, masks.masks)


class _MasksDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return dict(index=index, masks=random_masks(np.random.default_rng(index), count=index % 3 + 1, height=64, width=96))


def test_through_dataloader_workers():
    loader = torch.utils.data.DataLoader(_MasksDataset(), batch_size=2, num_workers=2, collate_fn=list)
    seen = 0
    for batch in loader:
        for item in batch:
            expected = _MasksDataset()[item["index"]]["masks"]
            assert np.array_equal(item["masks"].masks, expected.masks)
            seen += 1
    assert seen == 6
