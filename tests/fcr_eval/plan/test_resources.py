"""What a plan needs from the machine (fcr_eval.plan.resources): peak RAM per process that does not
grow with the sample count, disk that follows save_samples and n, compute that counts the uncached
reference, the 1 / 8 / 64-GPU projection, and `run` refusing a machine that cannot hold the plan."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fcr_eval.cli import main
from fcr_eval.plan import resources
from fcr_eval.plan.planner import make_plan, uncached_flops
from fcr_eval.plan.resources import machine_problems, plan_resources, unet_activation_elements
from fcr_eval.spec.experiment import load_experiment

EXPERIMENTS = Path(__file__).parents[3] / "experiments"
EXP1 = EXPERIMENTS / "exp-1-main-ablation.toml"


def _exp1(**sampling):
    exp = load_experiment(EXP1)
    if sampling:
        exp = dataclasses.replace(exp, sampling=dataclasses.replace(exp.sampling, **sampling))
    return exp


def _with_evaluation(exp, **evaluation):
    return dataclasses.replace(exp, evaluation=dataclasses.replace(exp.evaluation, **evaluation))


def _res(exp, **kw):
    return plan_resources(make_plan(exp, calibrate=False), **kw)


def test_peak_ram_does_not_grow_with_the_sample_count_but_disk_does():
    small, large = _res(_exp1(n_samples=1000)), _res(_exp1(n_samples=30000))
    assert large.peak_ram_bytes == small.peak_ram_bytes
    assert large.host_ram_bytes == small.host_ram_bytes and large.gpu_memory_bytes == small.gpu_memory_bytes
    run_small = next(iter(small.runs.values()))
    run_large = next(iter(large.runs.values()))
    # per-run disk (PNGs, features, rows) is linear in n
    assert run_large.disk_bytes == pytest.approx(30 * run_small.disk_bytes, rel=1e-9)
    assert large.total_disk_bytes > 10 * (small.total_disk_bytes - small.finetune_disk_bytes)


def test_peak_ram_grows_with_batch_size_and_resolution():
    base = _res(_exp1(batch_size=16))
    assert _res(_exp1(batch_size=32)).peak_ram_bytes > base.peak_ram_bytes
    assert _res(_exp1(batch_size=32)).gpu_memory_bytes > base.gpu_memory_bytes
    assert _res(_exp1(batch_size=32)).host_ram_bytes == base.host_ram_bytes  # the batch lives on the GPU
    assert _res(_exp1(resolution=768)).peak_ram_bytes > base.peak_ram_bytes
    # the UNet's activations scale with the latent's area
    cfg = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
    assert unet_activation_elements(cfg, 128) == pytest.approx(4 * unet_activation_elements(cfg, 64), rel=0.02)


def test_the_reference_set_and_feature_dimension_enter_the_metric_state():
    exp = _exp1()
    more = _res(_with_evaluation(exp, n_reference=60000))
    base = _res(exp)
    parts = next(iter(base.runs.values())).ram_parts
    assert next(iter(more.runs.values())).ram_parts["metric state"] > parts["metric state"]
    assert parts["networks"] > 4 * 859e6  # the SD UNet alone in float32
    # 15 fine-tunes keep 2 checkpoints of the UNet (fp32 weights + AdamW's moments) and the final UNet
    assert len(base.plan.finetunes) == 15
    assert base.finetune_disk_bytes == pytest.approx(15 * 859.52e6 * (2 * 12 + 4))


def test_disk_follows_save_samples():
    exp = _exp1(n_samples=1000)
    kept = _res(exp)
    none, first = _res(_with_evaluation(exp, save_samples="none")), _res(_with_evaluation(exp, save_samples=10))
    r_kept, r_none, r_first = (next(iter(x.runs.values())) for x in (kept, none, first))
    assert (r_kept.pngs, r_none.pngs, r_first.pngs) == (1000, 0, 10) and r_none.png_bytes == 0
    assert r_kept.png_bytes >= 1000 * 512 * 512 * 3  # raw uint8 RGB, an upper bound of a PNG
    assert r_first.png_bytes == pytest.approx(r_kept.png_bytes / 100)
    assert kept.total_disk_bytes - none.total_disk_bytes == pytest.approx(sum(r.png_bytes for r in kept.runs.values()))


def test_the_uncached_reference_is_counted_once_per_weights_and_seed():
    plan = make_plan(_exp1(n_samples=1000), calibrate=False)
    by = {(r.variation.id, r.seed): r for r in plan.runs}
    # the two baselines share the base weights' reference: the first samples it, the second reuses it
    fd5, fd10 = by["fd-5-baseline", 0], by["fd-10-baseline", 0]
    assert fd5.reference_flops == pytest.approx(uncached_flops(fd5)) and fd10.reference_flops == 0
    # each fine-tune's only run samples its own
    assert all(by[v, s].reference_flops > 0 for v in ("fcr-0.10-fd-10", "ft-0.00-fd-10") for s in (0, 1, 2))
    # an uncached run of the same weights and seed is the reference: no cached base run samples one
    wider = make_plan(load_experiment(EXP1, "wider"), calibrate=False)
    assert all(r.reference_flops == 0 for r in wider.runs if r.finetune is None)


def test_spilled_references_cost_disk_and_sampled_ones_compute():
    plan = make_plan(_exp1(n_samples=1000), calibrate=False)
    fd10 = next(r for r in plan.runs if r.variation.id == "fd-10-baseline")
    spill, sample = plan_resources(plan, "spill"), plan_resources(plan, "sample")
    assert sample.runs[fd10.run_id].flops - spill.runs[fd10.run_id].flops == pytest.approx(uncached_flops(fd10))
    # the three base-weights keys (one per seed) are spilled by FD-5 and live until FD-10 has run
    one_key = 1000 * (3 * 512 * 512 * 4 + (2048 + 1008) * 8)
    assert spill.reference_spill_peak_bytes == pytest.approx(3 * one_key) and sample.reference_spill_peak_bytes == 0
    assert spill.total_disk_bytes - sample.total_disk_bytes == pytest.approx(3 * one_key)
    assert spill.total_flops < sample.total_flops
    with pytest.raises(ValueError, match="reference mode 'resample' is not one of"):
        plan_resources(plan, "resample")


def test_projection_keeps_gpu_hours_and_divides_the_parallel_part():
    res = _res(_exp1())
    one, eight, many = res.projection((1, 8, 64))
    assert one.gpu_hours == eight.gpu_hours == many.gpu_hours
    assert one.wall_hours == pytest.approx(one.gpu_hours, rel=0.02)
    assert one.wall_hours / 8 <= eight.wall_hours < one.wall_hours / 7
    assert many.wall_hours > one.wall_hours / 64  # the main process's serial work and partial last rounds
    assert one.gpu_hours * 125e12 * 3600 >= make_plan(_exp1(), calibrate=False).total_flops
    assert res.projection((1,), tflops=250)[0].gpu_hours == pytest.approx(one.gpu_hours / 2)


def test_machine_problems_name_ram_and_disk_and_what_to_do(tmp_path):
    res = _res(_exp1(n_samples=1000))
    assert machine_problems(res, tmp_path, available_ram=1e15, free_disk=1e15) == []
    ram, disk = machine_problems(res, tmp_path, available_ram=2**30, free_disk=2**20)
    assert ram.startswith("RAM: a run needs") and "lower sampling.batch_size" in ram
    assert disk.startswith("disk: the 21 run(s) to do need") and "evaluation.save_samples" in disk
    assert "--reference sample spills no reference batches" in disk
    # two processes on a node need twice the RAM; a GPU process keeps the batch off host RAM
    need = res.peak_ram_bytes
    assert machine_problems(res, tmp_path, available_ram=1.5 * need, free_disk=1e15) == []
    assert machine_problems(res, tmp_path, processes=2, available_ram=1.5 * need, free_disk=1e15)
    assert machine_problems(res, tmp_path, gpu=True, processes=2, available_ram=2.1 * res.host_ram_bytes,
                            free_disk=1e15) == []
    assert machine_problems(res, tmp_path, done=set(res.runs), available_ram=1, free_disk=1) == []


def test_plan_prints_resources_and_the_projection(capsys):
    assert main(["plan", str(EXP1), "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "peak RAM per process ≈" in out and "independent of n_samples" in out and "disk ≈" in out
    assert "GPU-hours" in out and "RAM/process" in out and "uncached references (--reference, spill above)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("1", "8", "64")]
    assert [r[0] for r in rows] == ["1", "8", "64"]
    assert main(["plan", str(EXPERIMENTS / "mini-exp-1.toml"), "--profile", "quick", "--no-calibrate"]) == 0
    assert "GPU-hours" not in capsys.readouterr().out  # the embedded plan projects only when asked
    assert main(["plan", str(EXPERIMENTS / "mini-exp-1.toml"), "--profile", "quick", "--no-calibrate",
                 "--gpus", "2,4"]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours" in out and [line.split()[0] for line in out.splitlines() if line.strip()][-2:] == ["2", "4"]


def test_run_refuses_a_machine_without_the_disk_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resources, "_free_disk", lambda folder: 1024.0)
    store = tmp_path / "out" / "fcr.duckdb"
    code = main(["run", str(EXPERIMENTS / "mini-exp-1.toml"), "--profile", "quick", "--store", str(store),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "this machine cannot hold it — disk:" in err and "--no-resource-check" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing created
