"""Hooks for mmengine's Runner (registered in mmdet's HOOKS when this module is imported).

RNGStateHook makes ``--resume`` a true continuation. mmengine 0.10 restores weights, optimizer,
parameter schedulers, the iteration and the seed, but not the state of the random number
generators: a resumed run re-seeds them from scratch, so drop path masks, the RoI samplers and
the data augmentation draw different numbers than the uninterrupted run would have, and the two
runs part ways at the first iteration after the resume. This hook stores the torch (CPU and
current CUDA device), numpy and python ``random`` states in every checkpoint and puts them back
at the point where the uninterrupted run stood when that checkpoint was written.
"""
import logging
import random
from typing import Optional

import numpy as np
import torch
from mmengine.dist import get_world_size, is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from mmdet.registry import HOOKS

from .cudagraphs_per_shape import cudagraphs_per_shape

__all__ = ['BlockGraphsHook', 'ConvShapeBucketsHook', 'CudnnHook', 'GemmConvHook', 'RNGStateHook', 'capture_rng_state', 'restore_rng_state']

RNG_STATE_KEY = 'rng_state'


def capture_rng_state() -> dict:
    """The state of every generator the training step and the data pipeline draw from.

    Only tensors, strings, numbers and tuples, so checkpoints holding it still load under torch's
    ``weights_only=True`` (the numpy key array travels as an int64 tensor)."""
    numpy_state = np.random.get_state(legacy=False)
    if numpy_state['bit_generator'] != 'MT19937':
        raise RuntimeError(f"numpy's global generator is {numpy_state['bit_generator']}, "
                           f"expected MT19937 (np.random's legacy global state)")
    state = {
        'python': random.getstate(),
        'numpy': {
            'key': torch.from_numpy(numpy_state['state']['key'].astype(np.int64)),
            'pos': int(numpy_state['state']['pos']),
            'has_gauss': int(numpy_state['has_gauss']),
            'gauss': float(numpy_state['gauss']),
        },
        'torch': torch.get_rng_state(),
    }
    # Touching torch.cuda when nothing has used it yet would initialise CUDA for nothing.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    missing = {'python', 'numpy', 'torch'} - set(state)
    if missing:
        raise KeyError(f'RNG state lacks {sorted(missing)}; expected the dict capture_rng_state() '
                       f'returns (keys python, numpy, torch and, with CUDA, cuda)')
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state['numpy']
    np.random.set_state({
        'bit_generator': 'MT19937',
        'state': {'key': numpy_state['key'].numpy().astype(np.uint32), 'pos': numpy_state['pos']},
        'has_gauss': numpy_state['has_gauss'],
        'gauss': numpy_state['gauss'],
    })
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'].cpu())


class _RestoreAfterReplay:
    """Stands in for IterBasedTrainLoop's dataloader iterator while the loop replays it.

    On resume, IterBasedTrainLoop fast-forwards the data by drawing (and dropping) as many
    batches as were already trained on, then draws the first new one. Those replayed draws run
    the augmentations and so consume random numbers; the saved state belongs right after them,
    before the first new batch is drawn. So: let `replayed` draws through, then restore, then
    hand the loop its own iterator back."""

    def __init__(self, loop, replayed: int, restore):
        self._loop = loop
        self._inner = loop.dataloader_iterator
        self._remaining = replayed
        self._restore = restore

    def __iter__(self):
        return self

    def __next__(self):
        if self._remaining > 0:
            self._remaining -= 1
            return next(self._inner)
        self._restore()
        self._loop.dataloader_iterator = self._inner
        return next(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Save the RNG states in checkpoints; on resume, continue the saved random streams.

    Add it to a config as ``custom_hooks = [dict(type='RNGStateHook')]``.

    Where the states go back:
    - IterBasedTrainLoop: after the loop has fast-forwarded the dataloader to the resumed
      iteration, just before it draws the first new batch.
    - EpochBasedTrainLoop: at the start of the first epoch after the resume (exact when the
      checkpoint was written at the end of an epoch, which is what its CheckpointHook does).
    Validation during training is made neutral to the random streams (the states are put back
    after it), because it runs between a checkpoint and the next iteration in the uninterrupted
    run but not in the resumed one.

    Data workers (num_workers > 0) draw augmentations from their own generators, which mmengine
    seeds per worker; the dataloader replay on resume reproduces them (checked bitwise with two
    persistent workers). Runs compared bitwise must also use the same number of CPU threads.

    With several processes only rank 0's state is in the checkpoint (mmengine writes it from rank
    0), so only rank 0 continues its stream exactly; the other ranks keep their fresh seeds.
    """

    # Lowest: after_val rewinds after every other hook's after_val. (Other hooks' before_val run
    # before the snapshot; none of mmengine's or mmdet's draw random numbers there.) Saving and
    # restoring do not depend on the priority.
    priority = 'LOWEST'

    def __init__(self):
        self._saved_state: Optional[dict] = None
        self._saved_iter: Optional[int] = None
        self._state_before_val: Optional[dict] = None
        self._pending_epoch_restore = False

    # ---------------------------------------------------------------- saving
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        # A best-model checkpoint is written during validation; what belongs in it is the state
        # training will continue from, i.e. the one validation is about to be rewound to.
        state = self._state_before_val if self._state_before_val is not None else capture_rng_state()
        checkpoint.setdefault('meta', {})[RNG_STATE_KEY] = state

    # ---------------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        # Called for `load_from` as well as for resuming; before_train tells them apart.
        meta = checkpoint.get('meta') or {}
        self._saved_state = meta.get(RNG_STATE_KEY)
        self._saved_iter = meta.get('iter')

    def before_train(self, runner) -> None:
        if runner.iter == 0:
            # Fresh training, or weights loaded with `load_from` to start a new run from.
            self._saved_state = None
            return
        if self._saved_state is None:
            print_log(f'RNGStateHook: the checkpoint resumed at iteration {runner.iter} holds no '
                      f'RNG state (written without this hook?): training continues with freshly '
                      f'seeded generators, not the random streams of the interrupted run.',
                      logger='current', level=logging.WARNING)
            return
        if self._saved_iter != runner.iter:
            print_log(f'RNGStateHook: the RNG state is from iteration {self._saved_iter} but '
                      f'training resumes at {runner.iter}; not restoring it.',
                      logger='current', level=logging.WARNING)
            self._saved_state = None
            return
        if get_world_size() > 1 and not is_main_process():
            self._saved_state = None
            return
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop) and type(loop).run is IterBasedTrainLoop.run:
            loop.dataloader_iterator = _RestoreAfterReplay(loop, runner.iter, self._restore)
        elif isinstance(loop, EpochBasedTrainLoop) and type(loop).run is EpochBasedTrainLoop.run:
            if runner.iter != runner.epoch * len(loop.dataloader):
                print_log(f'RNGStateHook: resuming in the middle of epoch {runner.epoch} '
                          f'(iteration {runner.iter}); EpochBasedTrainLoop restarts that epoch, '
                          f'so the resumed run is not an exact continuation.',
                          logger='current', level=logging.WARNING)
            self._pending_epoch_restore = True
        else:
            print_log(f'RNGStateHook: {type(loop).__name__} is not a loop this hook knows where '
                      f'to resume in; restoring the RNG state before training starts.',
                      logger='current', level=logging.WARNING)
            self._restore()

    def before_train_epoch(self, runner) -> None:
        if self._pending_epoch_restore:
            self._pending_epoch_restore = False
            self._restore()

    def _restore(self) -> None:
        state, self._saved_state = self._saved_state, None
        if state is None:
            return
        restore_rng_state(state)
        print_log(f'RNGStateHook: random number generators restored to their state at iteration '
                  f'{self._saved_iter}.', logger='current', level=logging.INFO)

    # ---------------------------------------------------------------- validation
    def before_val(self, runner) -> None:
        self._state_before_val = capture_rng_state()

    def after_val(self, runner) -> None:
        if self._state_before_val is not None:
            restore_rng_state(self._state_before_val)
            self._state_before_val = None


def _bare_model(runner):
    """The runner's model without its DDP (or other mmengine) wrapper."""
    from mmengine.model import is_model_wrapper
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


@HOOKS.register_module()
class ConvShapeBucketsHook(Hook):
    """Before the run (training or testing), make the model's convolutions bucketed
    (mlla_det/models/conv_buckets.py): same outputs, but cuDNN meets a bounded set of input
    shapes, so its per-shape setup is paid once per bucket instead of at nearly every iteration
    of a multi-scale pipeline. Not in the configs: a new bucket still costs cuDNN's full setup
    (about 3.5 s an iteration on an H100), and over 40 iterations of the 1x pipeline this was
    slower than cuDNN off (CudnnHook): 1.34 against 0.31 s per iteration; a long run's warm
    buckets are not measured. ``exclude`` names submodules to leave as they are."""

    priority = 'VERY_HIGH'

    def __init__(self, exclude=()):
        self.exclude = tuple(exclude)

    def before_run(self, runner) -> None:
        from ..models.conv_buckets import bucket_convolutions
        count = bucket_convolutions(_bare_model(runner), self.exclude)
        print_log(f'ConvShapeBucketsHook: {count} convolutions bucketed', logger='current')


@HOOKS.register_module()
class CudnnHook(Hook):
    """Switch cuDNN on or off (``torch.backends.cudnn.enabled``) for the run, training or
    testing; the previous setting comes back after the run.

    cuDNN sets a convolution up once for each input shape it has not seen (benchmarks/
    conv_setup_cost.py: 380 ms for the first forward+backward of the detector's 14 kinds of
    non-fused convolution at a new size, bf16, against 12 ms warm, H100). The 1x pipeline gives
    almost every batch a new padded size and the mask head a new RoI count, so that setup is paid
    nearly every iteration: 2.58 s per MLLA-T iteration with cuDNN, 0.31-0.33 s without, on the
    same H100 (benchmarks/results/train_throughput_h100_v1/). PyTorch's own convolution kernels
    have no per-shape setup; they are slower per call (the same 14 convolutions: 20 ms against
    12 ms warm), which costs far less than the setup. The 1x configs therefore switch cuDNN off;
    ``--cfg-options custom_hooks.1.enabled=True`` switches it back on."""

    priority = 'VERY_HIGH'

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self._previous = None

    def before_run(self, runner) -> None:
        self._previous = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = self.enabled
        print_log(f'CudnnHook: cuDNN {"on" if self.enabled else "off"} for this run', logger='current')

    def after_run(self, runner) -> None:
        if self._previous is not None:
            torch.backends.cudnn.enabled = self._previous
            self._previous = None


@HOOKS.register_module()
class GemmConvHook(Hook):
    """Before the run (training or testing), make the model's dense convolutions and transposed
    convolutions batched GEMMs (mlla_det/models/gemm_conv.py): the same function, summed in
    another order. With cuDNN off (CudnnHook), PyTorch's own path for them loops over the batch,
    an im2col and a GEMM per image, forward and backward; the mask head's 100-250 RoIs per
    iteration made that thousands of kernel launches. One product per convolution has no per-shape
    setup either. Depthwise convolutions stay on PyTorch's kernel. ``enabled=False`` (the configs'
    switch) leaves the model untouched; the previous forwards come back after the run."""

    priority = 'VERY_HIGH'

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled)
        self._model = None

    def before_run(self, runner) -> None:
        if not self.enabled:
            return
        from ..models.gemm_conv import gemm_convolutions
        self._model = _bare_model(runner)
        count = gemm_convolutions(self._model)
        print_log(f'GemmConvHook: {count} convolutions run as batched GEMMs', logger='current')

    def after_run(self, runner) -> None:
        if self._model is not None:
            from ..models.gemm_conv import ungemm_convolutions
            ungemm_convolutions(self._model)
            self._model = None


@HOOKS.register_module()
class BlockGraphsHook(Hook):
    """Run the MLLA backbone's blocks as CUDA graphs in training, one graph per canvas.

    The multi-scale pipeline brings a new padded input size nearly every iteration, so graphs of
    the exact shapes would be recorded over and over. Instead each stage's blocks run on a canvas
    (``MLLA.set_canvas``): the token map zero-extended until its image's sides are multiples of
    ``canvas_multiple`` pixels, with masks that keep the outputs on the input's region those of the
    plain model (tests/test_canvas.py). Each stage's blocks are compiled once with dynamic shapes
    and run from CUDA graphs, recorded once per canvas and gradient mode and replayed for every
    size that fits the canvas, so that the blocks' hundreds of kernel launches cost one graph
    launch of host time. The stem, the downsampling layers, the neck and the heads stay as they are.

    On in the COCO configs: on the 1x pipeline (H100, MLLA-T, bf16) the median iteration went from
    0.219 to 0.178 s; each new canvas costs about 2.5 s once (a warm-up and a recording, forward and
    backward), 24 canvases in the first 100 iterations, about 40 in a long run (benchmarks/README.md).

    ``evaluation``: validation and testing on canvases too (graphs recorded per canvas in inference
    mode). Off by default: evaluation then runs the plain model, with the paper's padding, as
    without the hook; the graphs' gain there has not been measured since the heads stopped waiting
    for the GPU.

    ``distributed``: keep the graphs when training in several processes (DDP). Off by default,
    with a warning: the graphs have not been run under DDP yet (no machine of several GPUs was lent).

    ``backend``: 'cudagraphs' (default) replays the model's own kernels (AOT autograd and
    Inductor's CUDA-graph trees, no code generation), through ``cudagraphs_per_shape``: torch's
    own 'cudagraphs' backend records one graph for all shapes under dynamic shapes
    (pytorch/pytorch#131009). 'inductor' also fuses the elementwise steps
    (``mode='reduce-overhead'``), but its lowering with dynamic shapes fails in some torch versions
    (pytorch/pytorch#185510: "cannot determine truth value of Relational" while ordering symbolic
    strides; seen with torch 2.14 on the CPU).

    ``enabled=False`` leaves the model untouched (the configs' switch). On a machine without CUDA
    the hook does nothing but say so: graphs need a GPU."""

    priority = 'VERY_HIGH'
    BACKENDS = ('cudagraphs', 'inductor')

    def __init__(self, enabled: bool = True, canvas_multiple: int = 128, backend: str = 'cudagraphs',
                 recompile_limit: int = 64, evaluation: bool = False, distributed: bool = False):
        if backend not in self.BACKENDS:
            raise ValueError(f'BlockGraphsHook backend must be one of {self.BACKENDS}, got {backend!r}')
        self.enabled = bool(enabled)
        self.canvas_multiple = canvas_multiple
        self.backend = backend
        self.recompile_limit = recompile_limit
        self.evaluation = bool(evaluation)
        self.distributed = bool(distributed)
        self._backbone = None

    @property
    def active(self) -> bool:
        """Whether before_run set the blocks up as CUDA graphs (not when switched off, without CUDA, or
        in several processes without `distributed`)."""
        return self._backbone is not None

    def before_run(self, runner) -> None:
        from ..models.backbones.mlla import MLLA
        if not self.enabled:
            return
        if not torch.cuda.is_available():
            print_log('BlockGraphsHook: no CUDA device, the blocks run as they are', logger='current',
                      level=logging.WARNING)
            return
        if getattr(runner, 'distributed', False) and not self.distributed:
            print_log('BlockGraphsHook: training in several processes, where the blocks\' CUDA graphs have '
                      'not been verified yet; the blocks run as they are (BlockGraphsHook(distributed=True) '
                      'keeps the graphs)', logger='current', level=logging.WARNING)
            return
        backbone = getattr(_bare_model(runner), 'backbone', None)
        if not isinstance(backbone, MLLA):
            raise TypeError(f'BlockGraphsHook needs a model whose backbone is MLLA, got '
                            f'{type(backbone).__name__}; remove the hook from custom_hooks for '
                            f'other backbones')
        backbone.set_canvas(self.canvas_multiple)
        # Every stage compiles the same code object (MLLAStage.run_blocks_on_canvas), once per
        # stage and gradient mode and for batch size 1: more entries than Dynamo keeps by default (8).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, self.recompile_limit)
        options = (dict(backend=cudagraphs_per_shape) if self.backend == 'cudagraphs'
                   else dict(mode='reduce-overhead'))
        for stage in backbone.layers:
            stage.run_blocks_on_canvas = torch.compile(stage.run_blocks_on_canvas, dynamic=True, **options)
        self._backbone = backbone
        print_log(f'BlockGraphsHook: the blocks of {len(backbone.layers)} stages compiled for CUDA '
                  f'graphs ({self.backend}), canvases of multiples of {self.canvas_multiple} pixels, '
                  f'{"training and evaluation" if self.evaluation else "training only"}', logger='current')

    def _new_step(self) -> None:
        # Tells the graphs' memory pool that the previous step's outputs are no longer in use.
        if self.active:
            torch.compiler.cudagraph_mark_step_begin()

    def _evaluation_begins(self) -> None:
        if self.active and not self.evaluation:
            self._backbone.set_canvas(None)

    def _evaluation_ends(self) -> None:
        if self.active and not self.evaluation:
            self._backbone.set_canvas(self.canvas_multiple)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self._new_step()

    def before_val(self, runner) -> None:
        self._evaluation_begins()

    def after_val(self, runner) -> None:
        self._evaluation_ends()

    def before_test(self, runner) -> None:
        self._evaluation_begins()

    def after_test(self, runner) -> None:
        self._evaluation_ends()

    def before_val_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.evaluation:
            self._new_step()

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.evaluation:
            self._new_step()
