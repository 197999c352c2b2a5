"""mmengine 0.10's runner checkpoints on torch >= 2.6 (weights_only=True by default):
save -> resume -> test round trip with a real Runner on the CPU, and what the allowlist admits."""
import io
import json
import os
import pickle
import subprocess
import sys
import uuid
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from mlla_det.mmengine_compat import allow_mmengine_checkpoints, mmengine_safe_globals

allow_mmengine_checkpoints()  # no-op when mlla_det's __init__ already did it

from mmengine.evaluator import BaseMetric  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

TORCH_LOADS_WEIGHTS_ONLY = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 6)


class ToyRegression(Dataset):
    metainfo = dict(classes=("a", "b"), palette=[(1, 2, 3), (4, 5, 6)])

    def __init__(self, seed, size=16):
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(size, 3, generator=generator)
        self.targets = torch.randn(size, 1, generator=generator)

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, index):
        return dict(inputs=self.inputs[index], target=self.targets[index])


class TinyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, inputs, target, mode="tensor"):
        prediction = self.head(torch.relu(self.norm(self.linear(inputs))))
        if mode == "loss":
            return dict(loss=((prediction - target) ** 2).mean())
        return [dict(squared_error=((prediction - target) ** 2).mean())]


class MeanSquaredError(BaseMetric):
    """Returns numpy values, as many metrics do: they end up in the message hub and best_score."""

    def process(self, data_batch, data_samples):
        self.results += [float(sample["squared_error"]) for sample in data_samples]

    def compute_metrics(self, results):
        return dict(mse=np.float64(np.mean(results)), mse32=np.float32(np.mean(results)))


class RecordResumedState(Hook):
    """Captures what the runner resumed, before the first new iteration runs."""

    def __init__(self):
        self.state = None

    def before_train(self, runner):
        optimizer = runner.optim_wrapper.optimizer
        self.state = dict(
            iter=runner.iter,
            model={key: value.clone() for key, value in runner.model.state_dict().items()},
            optimizer_state=[{key: value.clone() if torch.is_tensor(value) else value
                              for key, value in optimizer.state[param].items()}
                             for group in optimizer.param_groups for param in group["params"]],
            lr=[group["lr"] for group in optimizer.param_groups],
            loss_history=runner.message_hub.get_scalar("train/loss").data[0].copy())


def make_runner(work_dir, max_iters, seed, dataset_seed, **kwargs):
    loader = dict(batch_size=4, num_workers=0, collate_fn=dict(type="default_collate"))
    return Runner(
        model=TinyModel(),
        work_dir=str(work_dir),
        experiment_name=f"mmengine_compat_{uuid.uuid4().hex}",
        train_dataloader=dict(dataset=ToyRegression(dataset_seed),
                              sampler=dict(type="DefaultSampler", shuffle=True), **loader),
        val_dataloader=dict(dataset=ToyRegression(dataset_seed + 1),
                            sampler=dict(type="DefaultSampler", shuffle=False), **loader),
        val_evaluator=dict(type=MeanSquaredError),
        val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=3),
        # The recipe's shape: AdamW without decay on norms, linear warm-up, then steps.
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05),
                           paramwise_cfg=dict(norm_decay_mult=0.0)),
        param_scheduler=[dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=2),
                         dict(type="MultiStepLR", by_epoch=False, milestones=[4, 7], gamma=0.1)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=3, by_epoch=False,
                                           save_best="mse", rule="less"),
                           logger=dict(type="LoggerHook", interval=1)),
        randomness=dict(seed=seed),
        default_scope="mmengine",
        **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-iteration run with checkpoints at iterations 3 and 6."""
    seed, dataset_seed = (int.from_bytes(os.urandom(2), "little") for _ in range(2))
    work_dir = tmp_path_factory.mktemp("first_run")
    runner = make_runner(work_dir, max_iters=6, seed=seed, dataset_seed=dataset_seed)
    runner.train()
    return dict(work_dir=work_dir, seed=seed, dataset_seed=dataset_seed,
                final_weights={key: value.clone() for key, value in runner.model.state_dict().items()})


def _registered_names():
    return {entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
            for entry in mmengine_safe_globals()}


@pytest.mark.skipif(not TORCH_LOADS_WEIGHTS_ONLY, reason="torch < 2.6 loads with weights_only=False")
def test_without_the_allowlist_runner_checkpoints_do_not_load(trained):
    """The problem being solved, shown in a fresh interpreter without mlla_det; and every global
    the checkpoint needs beyond torch's defaults is one that allow_mmengine_checkpoints() admits."""
    checkpoint = os.path.join(trained["work_dir"], "iter_6.pth")
    script = ("import json, pickle, sys, torch\n"
              "print(json.dumps(torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1])))\n"
              "try:\n    torch.load(sys.argv[1])\n"
              "except pickle.UnpicklingError as error:\n    print('refused')\n"
              "else:\n    print('loaded')\n")
    result = subprocess.run([sys.executable, "-c", script, checkpoint], capture_output=True, text=True,
                            timeout=120)
    lines = result.stdout.splitlines()
    assert lines[-1:] == ["refused"], result.stdout + result.stderr
    needed = set(json.loads(lines[0]))
    assert "mmengine.logging.history_buffer.HistoryBuffer" in needed
    assert needed <= _registered_names(), f"not allowlisted: {needed - _registered_names()}"


def test_checkpoint_loads_with_default_torch_load(trained):
    checkpoint_path = os.path.join(trained["work_dir"], "iter_6.pth")
    checkpoint = torch.load(checkpoint_path)  # default arguments: weights_only=True on torch >= 2.6
    assert checkpoint["meta"]["iter"] == 6 and checkpoint["meta"]["seed"] == trained["seed"]
    for key, value in trained["final_weights"].items():
        assert torch.equal(checkpoint["state_dict"][key], value)
    hub = checkpoint["message_hub"]
    losses = hub["log_scalars"]["train/loss"]
    assert isinstance(losses, HistoryBuffer) and len(losses.data[0]) == 6
    assert np.isfinite(losses.mean()) and losses.current() == losses.data[0][-1]
    assert isinstance(hub["runtime_info"]["best_score"], np.floating)
    assert isinstance(hub["log_scalars"]["val/mse32"].current(), np.floating)
    assert len(checkpoint["optimizer"]["state"]) == len(list(TinyModel().parameters()))


def test_resume_continues_at_the_saved_iteration_with_optimizer_state(trained, tmp_path):
    checkpoint_path = os.path.join(trained["work_dir"], "iter_3.pth")
    saved = torch.load(checkpoint_path)
    recorder = RecordResumedState()
    runner = make_runner(tmp_path, max_iters=6, seed=trained["seed"], dataset_seed=trained["dataset_seed"],
                         resume=True, load_from=checkpoint_path, custom_hooks=[recorder])
    runner.train()

    state = recorder.state
    assert state["iter"] == 3
    for key, value in saved["state_dict"].items():
        assert torch.equal(state["model"][key], value)
    saved_optimizer = [saved["optimizer"]["state"][index] for index in sorted(saved["optimizer"]["state"])]
    assert len(state["optimizer_state"]) == len(saved_optimizer) > 0
    for resumed, stored in zip(state["optimizer_state"], saved_optimizer):
        assert float(resumed["step"]) == float(stored["step"]) == 3
        assert torch.equal(resumed["exp_avg"], stored["exp_avg"]) and resumed["exp_avg"].abs().sum() > 0
        assert torch.equal(resumed["exp_avg_sq"], stored["exp_avg_sq"])
    assert state["lr"] == [group["lr"] for group in saved["optimizer"]["param_groups"]]
    assert len(state["loss_history"]) == 3  # the message hub came back too

    # Same seed, so the same data order, and the loop skips the 3 batches already seen:
    # iterations 4-6 must land on the first run's final weights.
    for key, value in trained["final_weights"].items():
        torch.testing.assert_close(runner.model.state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert runner.iter == 6


def test_test_loop_evaluates_a_saved_checkpoint(trained, tmp_path):
    """What tools/test.py does: a new runner with load_from, then runner.test()."""
    checkpoint_path = os.path.join(trained["work_dir"], "iter_6.pth")
    dataset = ToyRegression(trained["dataset_seed"] + 1)
    runner = Runner(model=TinyModel(), work_dir=str(tmp_path), experiment_name=f"test_{uuid.uuid4().hex}",
                    test_dataloader=dict(dataset=dataset, batch_size=4, num_workers=0,
                                         sampler=dict(type="DefaultSampler", shuffle=False),
                                         collate_fn=dict(type="default_collate")),
                    test_evaluator=dict(type=MeanSquaredError), test_cfg=dict(),
                    load_from=checkpoint_path, default_scope="mmengine")
    metrics = runner.test()

    model = TinyModel()
    model.load_state_dict(trained["final_weights"])
    model.eval()
    with torch.no_grad():
        expected = ((model.head(torch.relu(model.norm(model.linear(dataset.inputs)))) - dataset.targets) ** 2)
    np.testing.assert_allclose(metrics["mse"], expected.mean().item(), rtol=1e-5)


def _rename_globals_in_checkpoint(source, destination, old, new):
    """Rewrites the pickled global names of a torch zip checkpoint (protocol 2 GLOBAL opcodes are
    'c<module>\\n<name>\\n' text, so a module can be renamed in place)."""
    with zipfile.ZipFile(source) as archive_in, zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as archive_out:
        for item in archive_in.infolist():
            data = archive_in.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"c" + old.encode() + b"\n" in data
                data = data.replace(b"c" + old.encode() + b"\n", b"c" + new.encode() + b"\n")
                assert b"c" + old.encode() + b"\n" not in data
            archive_out.writestr(item, data)


@pytest.mark.skipif(not TORCH_LOADS_WEIGHTS_ONLY, reason="torch < 2.6 loads with weights_only=False")
def test_checkpoint_written_with_the_other_numpy_major_loads(trained, tmp_path):
    """numpy 2 pickles arrays via numpy._core.multiarray, numpy 1 via numpy.core.multiarray;
    a checkpoint from either must load here."""
    here = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"
    other = "numpy.core.multiarray" if here == "numpy._core.multiarray" else "numpy._core.multiarray"
    renamed = tmp_path / "other_numpy.pth"
    _rename_globals_in_checkpoint(os.path.join(trained["work_dir"], "iter_3.pth"), renamed, here, other)
    checkpoint = torch.load(renamed)
    losses = checkpoint["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(losses.data[0], np.ndarray) and len(losses.data[0]) == 3


class _GetattrOnAllowedClass:
    """Pickles as getattr(HistoryBuffer, name): the shape of mmengine's statistics methods,
    but a crafted file could name anything."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return getattr, (HistoryBuffer, self.name)


@pytest.mark.skipif(not TORCH_LOADS_WEIGHTS_ONLY, reason="torch < 2.6 loads with weights_only=False")
def test_getattr_is_limited_to_history_buffer_statistics():
    buffer = io.BytesIO()
    torch.save({"ok": _GetattrOnAllowedClass("mean")}, buffer)
    buffer.seek(0)
    assert torch.load(buffer)["ok"] is HistoryBuffer.mean

    for name in ("__init__", "__class__", "update", "register_statistics"):
        buffer = io.BytesIO()
        torch.save({"bad": _GetattrOnAllowedClass(name)}, buffer)
        buffer.seek(0)
        with pytest.raises(pickle.UnpicklingError, match="only allows HistoryBuffer's statistics"):
            torch.load(buffer)


class NotAllowlisted:
    pass


@pytest.mark.skipif(not TORCH_LOADS_WEIGHTS_ONLY, reason="torch < 2.6 loads with weights_only=False")
def test_weights_only_stays_on_for_everything_else():
    buffer = io.BytesIO()
    torch.save({"object": NotAllowlisted()}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer)


def test_allow_is_idempotent():
    allow_mmengine_checkpoints()
    allow_mmengine_checkpoints()
    if TORCH_LOADS_WEIGHTS_ONLY:
        names = [str(entry) for entry in torch.serialization.get_safe_globals()]
        assert sum("history_buffer_statistics_getattr" in name for name in names) == 1
