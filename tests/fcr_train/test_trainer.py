import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from fcr_train.data import (
    CaptionRecord,
    FashionMNISTDataset,
    ImageCaptionDataset,
    TooManyBadSamples,
)
from fcr_train.loss import FCRConfig, fcr_loss
from fcr_train.trainer import EmbeddedConditioner, TrainConfig, latest_checkpoint, train

from .conftest import TINY


def _conditioner(dim=8):
    g = torch.Generator().manual_seed(5)
    return EmbeddedConditioner(torch.randn(40, 4, dim, generator=g), torch.zeros(1, 4, dim))


@pytest.fixture(scope="module")
def fmnist():
    return FashionMNISTDataset("train", limit=96)


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY)


def _cfg(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=6, batch_size=8, lr=1e-3, checkpoint_every=2, seed=7,
                ema_decay=0.9, cond_dropout=0.2, progress=False, fcr=FCRConfig(lam=0.1, delta_max=5))
    base.update(kw)
    return TrainConfig(**base)


class Killed(Exception):
    pass


def _kill_at(n):
    """A step_callback that aborts the run after step ``n`` (its checkpoint, if any, is written)."""
    def callback(step, logs):
        if step == n:
            raise Killed
    return callback


def test_interrupted_and_resumed_run_reproduces_losses(tmp_path, fmnist, scheduler):
    full = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "full"))
    assert len(full.losses) == 6

    with pytest.raises(Killed):
        train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "cut"), step_callback=_kill_at(3))
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000002"
    # a fresh process would rebuild the model from scratch: the checkpoint must restore everything
    resumed = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "cut", resume=True))
    assert resumed.losses == full.losses[2:]  # exact, not approximate
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == full.losses
    a = UNet2DConditionModel.from_pretrained(full.final_unet)
    b = UNet2DConditionModel.from_pretrained(resumed.final_unet)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert full.final_unet.name == "unet_ema"


def test_run_folder_records_config_logs_and_blocks(tmp_path, fmnist, scheduler):
    res = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "r", max_steps=2, grad_accum=2,
                                                                  fcr=FCRConfig(lam=0.1, blocks="late", distance="cosine")))
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["train"]["fcr"] == {"lam": 0.1, "delta_max": 10, "delta_scale": 1, "blocks": "late", "distance": "cosine",
                                   "stop_grad": False, "batched": True, "delta_unit": "timesteps",
                                   "sampler_steps": None, "stride": None}
    assert cfg["train"]["grad_accum"] == 2
    assert "fcr-train=" in cfg["provenance"]["code"] and cfg["provenance"]["hardware"]["cpu_count"]
    rec = json.loads((res.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "l_denoise", "l_fcr", "step_time_s", "lr"):
        assert key in rec
    assert [k for k in rec if k.startswith("d/")] == ["d/down_blocks.1.resnets.0", "d/mid_block"]
    assert (res.run_dir / "train.log").read_text().count("saved checkpoint") >= 1
    assert json.loads((res.run_dir / "summary.json").read_text())["steps"] == 2


def test_few_steps_lower_the_loss(tmp_path, fmnist, scheduler):
    cond = _conditioner()
    x = torch.stack([fmnist[i]["pixels"] for i in range(32)])
    text = cond.prompt_states[torch.tensor([fmnist[i]["prompt_index"] for i in range(32)])]

    def eval_loss(unet):
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            return float(fcr_loss(unet, scheduler, x, text, FCRConfig(lam=0.1), generator=g).loss)

    before = eval_loss(_unet())
    res = train(_unet(), scheduler, fmnist, cond, _cfg(tmp_path, "fit", max_steps=25, lr=3e-3, ema_decay=None,
                                                         cond_dropout=0.0, checkpoint_every=100))
    after = eval_loss(UNet2DConditionModel.from_pretrained(res.final_unet))
    assert after < 0.8 * before, (before, after)


def test_early_stopping_hook(tmp_path, fmnist, scheduler):
    values = iter([1.0, 0.5, 0.7, 0.8, 0.9, 1.0])
    seen = []

    def metric(unet, step):
        assert not unet.training
        seen.append(step)
        return next(values)

    res = train(_unet(), scheduler, fmnist, _conditioner(),
                _cfg(tmp_path, "es", max_steps=20, validate_every=1, early_stopping_patience=2, checkpoint_every=50),
                validation_fn=metric)
    assert res.stopped_early and res.steps == 4 and seen == [1, 2, 3, 4]
    assert res.best_metric == 0.5 and res.best_checkpoint.name == "step_0000002"
    assert (res.best_checkpoint / "unet" / "config.json").is_file()


def test_bad_data_stops_past_threshold(tmp_path, scheduler):
    from PIL import Image

    good = tmp_path / "ok.png"
    Image.new("L", (10, 10), 128).save(good)
    recs = [CaptionRecord(str(good), "a")] * 6 + [CaptionRecord(str(tmp_path / f"missing{i}.png"), "b") for i in range(6)]
    ds = ImageCaptionDataset(recs, resolution=8, mode="L")

    class Cond:
        null_states = torch.zeros(1, 4, 8)

        def __call__(self, batch, device, generator=None):
            return batch["pixels"], torch.zeros(len(batch["caption"]), 4, 8)

    cfg = _cfg(tmp_path, "bad", max_bad_fraction=0.2, batch_size=4, ema_decay=None)
    with pytest.raises(TooManyBadSamples, match="unreadable or missing"):
        train(_unet(), scheduler, ds, Cond(), cfg)
    # under the threshold the run goes on, counting the skipped samples
    cfg = _cfg(tmp_path, "bad2", max_bad_fraction=0.9, batch_size=4, ema_decay=None, max_steps=3)
    res = train(_unet(), scheduler, ds, Cond(), cfg)
    assert res.steps == 3 and res.last_logs["bad_samples"] > 0


def test_grad_checkpointing_and_bf16_options(tmp_path, fmnist, scheduler):
    plain = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "p", max_steps=2, checkpoint_every=10))
    ckpt = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "c", max_steps=2, checkpoint_every=10,
                                                                   grad_checkpointing=True))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)  # recomputation changes memory, not maths
    bf16 = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "b", max_steps=2, checkpoint_every=10,
                                                                   mixed_precision="bf16"))
    assert bf16.losses[0] == pytest.approx(plain.losses[0], rel=0.05) and bf16.losses != plain.losses


@pytest.mark.parametrize("checkpoint_every", [2, 50])
def test_resume_restores_early_stopping_state_exactly(tmp_path, fmnist, scheduler, checkpoint_every):
    """A run cut right after a validation and resumed stops at the same step with the same best
    checkpoint as an uninterrupted one.  checkpoint_every=2: the cut falls on a regular checkpoint
    step, whose checkpoint must already hold that step's validation; 50: the checkpoint written for
    the validation must already name that step as the best checkpoint."""
    values = {1: 1.0, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.9, 6: 1.0, 7: 1.1, 8: 1.2}

    def metric(unet, step):
        return values[step]

    cfg = dict(max_steps=8, validate_every=1, early_stopping_patience=3, checkpoint_every=checkpoint_every,
               ema_decay=None, cond_dropout=0.0)
    full = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "full", **cfg), validation_fn=metric)
    assert full.stopped_early and full.steps == 5 and full.best_checkpoint.name == "step_0000002"

    with pytest.raises(Killed):
        train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "cut", **cfg), validation_fn=metric,
              step_callback=_kill_at(2))
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000002"
    resumed = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "cut", resume=True, **cfg),
                    validation_fn=metric)
    assert (resumed.stopped_early, resumed.steps, resumed.best_metric) == (True, 5, 0.5)
    assert resumed.best_checkpoint == tmp_path / "cut" / "checkpoints" / "step_0000002"
    log = [json.loads(x) for x in (tmp_path / "cut" / "validation.jsonl").read_text().splitlines()]
    assert log == [json.loads(x) for x in (tmp_path / "full" / "validation.jsonl").read_text().splitlines()]


def test_resume_takes_early_stopping_settings_from_the_config(tmp_path, fmnist, scheduler):
    """The checkpoint restores the early-stopping counters, not its settings: a run resumed with a
    larger patience (which config.json then records) runs on with that patience."""
    values = iter([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0])

    def metric(unet, step):
        return next(values)

    cfg = dict(validate_every=1, checkpoint_every=50, ema_decay=None, cond_dropout=0.0)
    first = train(_unet(), scheduler, fmnist, _conditioner(),
                  _cfg(tmp_path, "p", max_steps=2, early_stopping_patience=2, **cfg), validation_fn=metric)
    assert not first.stopped_early  # one bad round of two allowed
    res = train(_unet(), scheduler, fmnist, _conditioner(),
                _cfg(tmp_path, "p", max_steps=8, early_stopping_patience=4, resume=True, **cfg), validation_fn=metric)
    assert res.stopped_early and res.steps == 5  # bad rounds at steps 2, 3, 4, 5
    assert json.loads((tmp_path / "p" / "config.json").read_text())["train"]["early_stopping_patience"] == 4


def test_each_step_logs_the_fcr_share_of_the_loss(tmp_path, fmnist, scheduler):
    # Δ in sampler steps: 10 sampler steps over T = 100 → Δ ∈ {10, 20, 30} timesteps.
    fcr = FCRConfig(lam=0.5, delta_unit="sampler_steps", sampler_steps=10, delta_max=None, stride=3)
    res = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "share", max_steps=4, log_every=2, fcr=fcr))
    recs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["l_fcr_weighted"] == pytest.approx(0.5 * r["l_fcr"])
        assert r["fcr_to_denoise"] == pytest.approx(0.5 * r["l_fcr"] / r["l_denoise"])
        assert r["l_fcr"] > 0
    assert res.fcr_to_denoise == [r["fcr_to_denoise"] for r in recs]
    log = (res.run_dir / "train.log").read_text()
    assert [ln.split("step ")[1].split(":")[0] for ln in log.splitlines() if "λ·l_fcr/l_denoise" in ln] == ["1", "2", "4"]
    cfg = json.loads((res.run_dir / "config.json").read_text())["train"]["fcr"]
    assert (cfg["delta_unit"], cfg["sampler_steps"], cfg["delta_max"], cfg["stride"]) == ("sampler_steps", 10, 3, 3)
    plain = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, "plain", max_steps=2,
                                                                      fcr=FCRConfig(lam=0.0)))
    assert plain.fcr_to_denoise == [0.0, 0.0]


def test_checkpoint_every_leaves_the_weights_alone_and_cond_dropout_changes_them(tmp_path, fmnist, scheduler):
    """What fcr_eval.plan.identity decides for a fine-tune's key: how often the trainer saves does
    not change the weights (so it is not in the key), the null-text dropout does (so it is)."""
    def weights(name, **kw):
        result = train(_unet(), scheduler, fmnist, _conditioner(), _cfg(tmp_path, name, max_steps=4, **kw))
        return list(UNet2DConditionModel.from_pretrained(result.final_unet).parameters())

    often, rarely = weights("often", checkpoint_every=1), weights("rarely", checkpoint_every=100)
    assert all(torch.equal(p, q) for p, q in zip(often, rarely, strict=True))
    dropped = weights("dropped", checkpoint_every=100, cond_dropout=0.9)
    assert not all(torch.equal(p, q) for p, q in zip(rarely, dropped, strict=True))
