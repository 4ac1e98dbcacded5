import json

import pytest
import torch
from fcr_train.cli import build_parser, main
from fcr_train.models import ModelNotAvailableError, load_sd_components


def test_offline_hub_id_names_missing_part(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotAvailableError) as err:
        load_sd_components("sd15")
    msg = str(err.value)
    assert "'unet'" in msg and "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "--model /path/to/folder" in msg


def test_local_folder_missing_parts(tmp_path):
    from diffusers import UNet2DConditionModel
    from fcr_train.embedded import TINY_UNET_CONFIG

    UNet2DConditionModel(**TINY_UNET_CONFIG).save_pretrained(tmp_path / "sd" / "unet")
    (tmp_path / "sd" / "vae").mkdir()
    with pytest.raises(ModelNotAvailableError, match=r"Missing subfolders: \['text_encoder', 'tokenizer', 'scheduler'\]"):
        load_sd_components(str(tmp_path / "sd"))
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        load_sd_components(str(tmp_path / "nope"))


def test_every_cli_option_is_documented():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"finetune", "pretrain"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 8, (name, action.dest)
        text = p.format_help()
        for flag in ("--lam", "--delta-max", "--blocks", "--distance", "--stop-grad", "--resume", "--checkpoint-every",
                     "--mixed-precision", "--grad-accum", "--grad-checkpointing", "--ema-decay", "--warmup-steps"):
            assert flag in text


def test_cli_finetune_tiny_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", "embedded-tiny", "--limit", "64", "--batch-size", "8", "--max-steps", "2",
            "--checkpoint-every", "1", "--lam", "0.2", "--blocks", "down_blocks.1,mid_block", "--distance", "relative_mse",
            "--stop-grad", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    assert "final UNet" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["fcr"]["blocks"] == ["down_blocks.1", "mid_block"] and cfg["train"]["fcr"]["stop_grad"]
    assert cfg["run"]["finetune"]["model"] == "embedded-tiny"
    resume = [*args, "--resume"]
    resume[resume.index("--max-steps") + 1] = "3"
    assert main(resume) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_cli_reports_errors(tmp_path, caplog):
    assert main(["finetune", "--model", str(tmp_path / "missing-model"), "--data", "coco", "--data-path", "x.json",
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in caplog.text
    assert main(["finetune", "--model", "embedded-tiny", "--data", "coco", "--output-dir", str(tmp_path / "r")]) == 2
    assert "fashion-mnist" in caplog.text
    torch.set_num_threads(1)
