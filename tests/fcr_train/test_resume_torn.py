"""Resumes that survive a torn checkpoint, and refuse a foreign one before anything is written.

A run killed after step 5 leaves checkpoints 2 and 4; step 4 is then damaged the ways a full disk
or a cut copy damages it. ``resume=True`` must report step 4 and continue from step 2 exactly as
an uninterrupted run does; when no checkpoint loads the error names all of them. A checkpoint of
another UNet, and ``blocks`` naming no feature of the UNet, are refused before the output folder
exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from fcr_train.checkpoints import CheckpointError, model_mismatch, unreadable_reason
from fcr_train.data import FashionMNISTDataset
from fcr_train.loss import FCRConfig
from fcr_train.trainer import EmbeddedConditioner, TrainConfig, train

from .conftest import TINY

# slow: real fine-tunes killed, torn and resumed
pytestmark = pytest.mark.slow

# Same layout as TINY, other widths: every conv and attention weight has another shape.
OTHER = {**TINY, "block_out_channels": (8, 16)}


def _unet(config=TINY):
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def _conditioner():
    g = torch.Generator().manual_seed(5)
    return EmbeddedConditioner(torch.randn(40, 4, 8, generator=g), torch.zeros(1, 4, 8))


def _cfg(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, batch_size=8, lr=1e-3, checkpoint_every=2, seed=7,
                ema_decay=0.9, progress=False, fcr=FCRConfig(lam=0.1, delta_max=5))
    base.update(kw)
    return TrainConfig(**base)


class Killed(Exception):
    pass


def _kill_after(n):
    def callback(step, logs):
        if step == n:
            raise Killed
    return callback


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fmnist():
    return FashionMNISTDataset("train", limit=96)


@pytest.fixture(scope="module")
def full(tmp_path_factory, fmnist, scheduler_module):
    """The uninterrupted 6-step run every resumed run must equal."""
    torch.set_num_threads(1)
    return train(_unet(), scheduler_module, fmnist, _conditioner(), _cfg(tmp_path_factory.mktemp("full") / "run"))


@pytest.fixture(scope="module")
def scheduler_module():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")


def _cut_run(out: Path, fmnist, scheduler) -> Path:
    """A run killed after step 5: checkpoints step 2 and step 4 on disk."""
    with pytest.raises(Killed):
        train(_unet(), scheduler, fmnist, _conditioner(), _cfg(out), step_callback=_kill_after(5))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    return out


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _damage(ckpt: Path, how: str) -> None:
    if how == "optimizer cut off":
        _truncate(ckpt / "optimizer.bin")
    elif how == "model cut off":
        _truncate(ckpt / "model.safetensors")
    elif how == "optimizer of other content":
        # A whole torch file, so the header checks pass and only accelerate's load fails.
        torch.save({"not": "an optimizer state"}, ckpt / "optimizer.bin")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["optimizer cut off", "model cut off", "optimizer of other content"])
def test_torn_last_checkpoint_falls_back_to_the_previous_one(tmp_path, fmnist, scheduler_module, full, how, caplog):
    out = _cut_run(tmp_path / "cut", fmnist, scheduler_module)
    _damage(out / "checkpoints" / "step_0000004", how)
    with caplog.at_level(logging.WARNING, logger="fcr_train"):
        resumed = train(_unet(), scheduler_module, fmnist, _conditioner(), _cfg(out, resume=True))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_0000004" in m for m in warned), warned
    assert json.loads((out / "config.json").read_text())["resumed_from"].endswith("step_0000002")
    # from step 2 the resumed run is the uninterrupted one, bit for bit
    assert resumed.losses == full.losses[2:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == full.losses
    a = UNet2DConditionModel.from_pretrained(full.final_unet)
    b = UNet2DConditionModel.from_pretrained(resumed.final_unet)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    # the torn checkpoint was written again, whole
    assert unreadable_reason(out / "checkpoints" / "step_0000004") is None


def test_no_checkpoint_loads_names_them_all_and_changes_nothing(tmp_path, fmnist, scheduler_module):
    out = _cut_run(tmp_path / "cut", fmnist, scheduler_module)
    _damage(out / "checkpoints" / "step_0000004", "optimizer cut off")
    _damage(out / "checkpoints" / "step_0000002", "model cut off")
    before = _digest(out)
    with pytest.raises(CheckpointError) as e:
        train(_unet(), scheduler_module, fmnist, _conditioner(), _cfg(out, resume=True))
    assert "step_0000004" in str(e.value) and "step_0000002" in str(e.value)
    assert "optimizer.bin" in str(e.value) and "model.safetensors" in str(e.value)
    assert _digest(out) == before


def test_checkpoint_of_another_model_is_refused_before_any_folder(tmp_path, fmnist, scheduler_module):
    other = train(_unet(OTHER), scheduler_module, fmnist, _conditioner(), _cfg(tmp_path / "other", max_steps=2))
    ckpt = other.last_checkpoint
    assert model_mismatch(ckpt, _unet(OTHER)) is None  # the check accepts the model that wrote it
    new = tmp_path / "new"
    with pytest.raises(CheckpointError) as e:
        train(_unet(), scheduler_module, fmnist, _conditioner(), _cfg(new, resume=str(ckpt)))
    msg = str(e.value)
    assert f"cannot resume from {ckpt}: it is a checkpoint of another model" in msg
    assert "conv_in.weight is [8, 1, 3, 3] in the checkpoint but [4, 1, 3, 3] in this model" in msg
    assert not new.exists()
    # --resume in the other model's own folder: refused too, and its files are left as they were
    before = _digest(other.run_dir)
    with pytest.raises(CheckpointError, match="another model"):
        train(_unet(), scheduler_module, fmnist, _conditioner(), _cfg(other.run_dir, resume=True))
    assert _digest(other.run_dir) == before


def test_blocks_naming_no_feature_are_refused_before_any_folder(tmp_path, fmnist, scheduler_module):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"FCRConfig.blocks = '99,foo'.*no encoder feature matches \['99', 'foo'\]"):
        train(_unet(), scheduler_module, fmnist, _conditioner(),
              _cfg(out, fcr=FCRConfig(lam=0.1, delta_max=5, blocks=("99", "foo"))))
    assert not out.exists()


def test_cli_resume_with_torn_last_checkpoint_continues(tmp_path, warm_runner):
    """The real command: a torn newest checkpoint is a warning naming it, not a traceback. Two real
    fcr-train processes, the fine-tune and its resume, forked from the ``warm_runner`` interpreter
    (``tests/warm.py``: ~6 s of imports each saved)."""
    env = {"FCR_DEBUG": None, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--threads", "1", "finetune", "--model", "embedded-tiny", "--output-dir", "run",
            "--max-steps", "4", "--checkpoint-every", "2", "--batch-size", "4", "--limit", "32", "--no-progress"]
    first = warm_runner.start("fcr_train.cli", args, cwd=tmp_path, env=env)
    assert first.wait(300) == 0, first.stderr[-3000:]
    _truncate(tmp_path / "run" / "checkpoints" / "step_0000004" / "optimizer.bin")
    again = warm_runner.start("fcr_train.cli", [*args, "--resume"], cwd=tmp_path, env=env)
    assert again.wait(300) == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert "step_0000004: optimizer.bin is cut off" in again.stderr
    assert "resumed from run/checkpoints/step_0000002 at step 2" in again.stderr
    assert unreadable_reason(tmp_path / "run" / "checkpoints" / "step_0000004") is None
