"""The objective registry (fcr_train.objectives): the trainer looks each objective up from its
config, so a new objective is one module and one row — shown here with a toy one the trainer has
never heard of — and FCR and output consistency share one Δ-sampling record."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from fcr_train import objectives
from fcr_train.data import FashionMNISTDataset
from fcr_train.delta import DeltaSampling
from fcr_train.loss import FCRConfig, denoise_target
from fcr_train.objectives import OBJECTIVES, Objective, ObjectiveModule, objective_for
from fcr_train.output_consistency import OutputConsistencyConfig
from fcr_train.rollout import RolloutConfig
from fcr_train.trainer import TrainConfig, train

from .conftest import new_tiny_unet as _unet
from .conftest import tiny_conditioner as _conditioner


@dataclasses.dataclass(frozen=True)
class ToyConfig(DeltaSampling):
    lam: float = 0.5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _toy_loss(unet, scheduler, x0, text, config, *, noise, timesteps, deltas):
    pred = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, text).sample
    denoise = F.mse_loss(pred, denoise_target(scheduler, x0, noise, timesteps))
    toy = pred.pow(2).mean()
    return SimpleNamespace(loss=denoise + config.lam * toy, denoise=denoise, toy=toy)


def _toy_draw(module, n, num_train_timesteps, *, generator, device, draw_noise):
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return t.to(device), torch.zeros_like(t).to(device), draw_noise()


def test_a_new_objective_is_one_row_and_the_trainer_trains_it(tmp_path, monkeypatch, scheduler):
    checked = []
    row = Objective("toy", ToyConfig, check=lambda *a, **k: checked.append(True),
                    module=lambda u, s, c, cond: ObjectiveModule(u, s, c, _toy_loss), draw=_toy_draw, term="toy")
    monkeypatch.setitem(OBJECTIVES, "toy", row)
    result = train(_unet(), scheduler, FashionMNISTDataset("train", limit=16), _conditioner(),
                   TrainConfig(output_dir=str(tmp_path / "toy"), max_steps=2, batch_size=4, progress=False,
                               fcr=FCRConfig(lam=0.0), objective=ToyConfig(lam=0.5)))
    assert checked == [True] and result.steps == 2
    logs = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["l_denoise"] + 0.5 * r["l_toy"]) for r in logs)
    assert result.objective_to_denoise == [r["toy_to_denoise"] for r in logs]
    saved = json.loads((result.run_dir / "config.json").read_text())["train"]
    assert saved["toy"] == {**ToyConfig(lam=0.5).to_dict()} and saved["output_consistency"] is None


def test_objectives_share_the_delta_record_and_are_found_by_their_config():
    assert objective_for(FCRConfig()).name == "fcr"
    assert objective_for(OutputConsistencyConfig()).name == "output_consistency"
    assert objective_for(RolloutConfig(lam=0.5, k=2)).name == "rollout"
    for cfg in (FCRConfig, OutputConsistencyConfig):
        assert issubclass(cfg, DeltaSampling)
        with pytest.raises(ValueError, match=r"delta_max = None means 'the stride it serves'"):
            cfg(lam=0.1, delta_max=None)
        assert cfg(lam=0.1, delta_max=None, stride=5).delta_max == 5
        assert cfg(lam=0.1, delta_unit="sampler_steps", sampler_steps=20).timesteps_per_delta(1000) == 50
    with pytest.raises(TypeError, match="no fine-tuning objective takes a ToyConfig"):
        objective_for(ToyConfig())
    with pytest.raises(TypeError, match="ToyConfig"):
        TrainConfig(fcr=FCRConfig(lam=0.0), objective=ToyConfig())
    assert set(objectives.__all__) >= {"OBJECTIVES", "objective_for"}
