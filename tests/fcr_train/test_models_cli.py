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


def _digest(root):
    import hashlib

    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("change, stored, now", [
    (("--lam", "0.3"), "fcr.lam = 0.2", "0.3 now"),
    (("--batch-size", "4"), "batch_size = 8", "4 now"),
    (("--oc-lam", "0.1", "--lam", "0"), "output_consistency = None in the stored run", "'lam': 0.1,"),
    (("--seed", "3"), "seed = 0", "3 now"),
    (("--limit", "32"), "data.limit = 64", "32 now"),
], ids=["lam", "batch-size", "objective", "seed", "data-limit"])
def test_cli_resume_with_changed_settings_is_refused(tmp_path, capsys, change, stored, now):
    """A resume is exact or refused: a setting that changes results, changed, names both values,
    and nothing of the run folder changes (config.json is not rewritten, no step runs)."""
    out = tmp_path / "run"
    args = ["finetune", "--model", "embedded-tiny", "--limit", "64", "--batch-size", "8", "--max-steps", "1",
            "--checkpoint-every", "1", "--lam", "0.2", "--output-dir", str(out), "--no-progress"]
    assert main(args) == 0
    before = _digest(out)
    capsys.readouterr()
    resumed = [*args, "--resume"]
    resumed[resumed.index("--max-steps") + 1] = "2"
    for i in range(0, len(change), 2):
        if change[i] in resumed:
            resumed[resumed.index(change[i]) + 1] = change[i + 1]
        else:
            resumed += change[i:i + 2]
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert f"cannot resume in {out}" in err and str(out / "config.json") in err, err
    assert stored in err and now in err, err
    assert "Traceback" not in err
    assert _digest(out) == before


def test_cli_reports_errors(tmp_path, capsys):
    assert main(["finetune", "--model", str(tmp_path / "missing-model"), "--data", "coco", "--data-path", "x.json",
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--model", "embedded-tiny", "--data", "coco", "--output-dir", str(tmp_path / "r")]) == 2
    assert "fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # checked before the run folder is made
    torch.set_num_threads(1)


@pytest.fixture
def tiny_sd_folder(tmp_path):
    """A complete, tiny SD-layout folder (v-prediction) written offline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path / "sd"
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(4, 8),
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                         cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  block_out_channels=(4, 8), latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16)).save_pretrained(root / "text_encoder")
    tok = root / "tokenizer"
    tok.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "c</w>": 4, "a": 5, "b": 6, "c": 7}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=16).save_pretrained(tok)
    DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


def test_sd_finetune_from_local_folder_on_coco(tmp_path, tiny_sd_folder):
    from fcr_train import DataConfig, FCRConfig, FinetuneConfig, TrainConfig, finetune
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (10 + i, 9), (60 * i, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
    ann = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
           "annotations": [{"id": i, "image_id": i, "caption": "a b" if i % 2 else ""} for i in range(4)]}
    (tmp_path / "captions.json").write_text(json.dumps(ann))
    cfg = FinetuneConfig(model=str(tiny_sd_folder),
                         data=DataConfig(kind="coco", path=str(tmp_path / "captions.json"), images_dir=str(tmp_path / "img")),
                         train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, lr=1e-3,
                                           checkpoint_every=1, progress=False, fcr=FCRConfig(lam=0.1, delta_max=3)))
    res = finetune(cfg)
    assert res.steps == 2 and (res.final_unet / "config.json").is_file()
    saved = json.loads((res.run_dir / "config.json").read_text())
    assert saved["scheduler"]["prediction_type"] == "v_prediction"  # taken from the checkpoint's scheduler
    assert saved["conditioner"]["resolution"] == 8 and res.last_logs["l_fcr"] > 0


def test_cli_pretrain_tiny_exports_weights_with_command(tmp_path):
    export = tmp_path / "weights"
    assert main(["pretrain", "--unet-config", "tiny", "--limit", "64", "--batch-size", "8", "--max-steps", "2",
                 "--output-dir", str(tmp_path / "run"), "--export-dir", str(export), "--grid-columns", "1",
                 "--sample-steps", "2", "--no-progress"]) == 0
    record = json.loads((export / "command.json").read_text())
    assert record["command"].startswith("fcr-train pretrain --unet-config tiny") and record["steps"] == 2
    assert "fcr-train=" in record["provenance_at_start"]["code"]
    assert (export / "samples.png").is_file() and (export / "diffusion_pytorch_model.safetensors").is_file()
    from fcr_train import load_embedded_base

    base = load_embedded_base(export)
    assert base.provenance["steps"] == 2 and base.prompt_states.shape == (40, 16, 384)
