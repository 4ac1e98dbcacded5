import gzip
import json
import os

import numpy as np
import pytest
import torch
from fcr_train.data import FashionMNISTDataset
from fcr_train.embedded import (
    BASE_WEIGHTS_DIR,
    EMBEDDED_UNET_CONFIG,
    FASHION_MNIST_CLASSES,
    build_unet,
    class_prompts,
    fashion_mnist_dir,
    load_fashion_mnist,
    read_idx,
)
from torch.utils.flop_counter import FlopCounterMode


def test_embedded_unet_is_cheap_enough():
    unet = build_unet(EMBEDDED_UNET_CONFIG)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = unet(torch.randn(1, 1, 28, 28), torch.tensor([500]), torch.randn(1, 16, 384)).sample
    assert out.shape == (1, 1, 28, 28)
    assert fc.get_total_flops() <= 0.3e9  # design.md: about 0.3 GFLOPs per image or less
    assert sum(p.numel() for p in unet.parameters()) * 4 <= 20e6  # fp32 weights fit the 20 MB budget


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + arr.tobytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist_dir(tmp_path)


def test_fashion_mnist_captions_match_prompt_index():
    ds = FashionMNISTDataset("test", limit=20)
    prompts = class_prompts()
    assert len(ds) == 20 and len(prompts) == 40
    for i in range(20):
        item = ds[i]
        assert prompts[item["prompt_index"]] == item["caption"]
        assert FASHION_MNIST_CLASSES[item["label"]] in item["caption"]
        assert item["pixels"].shape == (1, 28, 28) and -1 <= float(item["pixels"].min()) <= float(item["pixels"].max()) <= 1


def test_fashion_mnist_items_are_the_scaled_images_and_the_dataset_copies_none():
    """Each item is its image scaled to [-1, 1] (x / 127.5 - 1, float32: the values a float copy of
    the whole split held), for a class subset and a limit too; the dataset keeps the decoded uint8
    images themselves, not a copy of them (188 MB of float32 for the train split)."""
    images, labels = load_fashion_mnist("train")
    ds = FashionMNISTDataset("train")
    assert len(ds) == len(images) == 60_000
    assert ds.images.dtype == np.uint8 and np.shares_memory(ds.images, images)
    for i in (0, 1, 12_345, 59_999):
        assert torch.equal(ds[i]["pixels"], torch.from_numpy(images[i].astype(np.float32) / 127.5 - 1.0)[None])
        assert ds[i]["pixels"].dtype == torch.float32 and ds[i]["label"] == labels[i]
    sub = FashionMNISTDataset("train", classes=[3, 7], limit=50)
    keep = np.flatnonzero(np.isin(labels, [3, 7]))[:50]
    assert len(sub) == 50
    assert torch.equal(torch.stack([sub[j]["pixels"] for j in range(50)]),
                       torch.from_numpy(images[keep].astype(np.float32) / 127.5 - 1.0)[:, None])
    assert [sub[j]["label"] for j in range(50)] == labels[keep].tolist()


def test_minilm_token_states_load_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from fcr_train.text import MiniLMTextEncoder

    enc = MiniLMTextEncoder()
    states = enc(["a photo of a sneaker", "a photo of a bag", "a photo of a sneaker"])
    assert states.shape == (3, 16, 384)
    assert torch.equal(states[0], states[2]) and not torch.allclose(states[0], states[1])


@pytest.mark.skipif(not (BASE_WEIGHTS_DIR / "config.json").is_file(), reason="base weights not trained yet")
def test_shipped_base_weights():
    files = list(BASE_WEIGHTS_DIR.glob("*.safetensors"))
    assert files and sum(os.path.getsize(f) for f in files) <= 20 * 2**20
    record = json.loads((BASE_WEIGHTS_DIR / "command.json").read_text())
    assert record["command"].startswith("fcr-train") and "pretrain" in record["command"]
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(BASE_WEIGHTS_DIR)
    assert unet.config.block_out_channels == list(EMBEDDED_UNET_CONFIG["block_out_channels"])


def test_sample_images_with_fcr_sample_encoder_cache():
    from fcr_sample import (
        EncoderCacheConfig,
        apply_encoder_cache,
        get_cache_stats,
        remove_encoder_cache,
    )
    from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
    from fcr_train.embedded import EmbeddedBase, make_scheduler, sample_images

    g = torch.Generator().manual_seed(0)
    base = EmbeddedBase(unet=build_unet(TINY_EMBEDDED_UNET_CONFIG).eval(), scheduler=make_scheduler(),
                        classes=("a", "b"), templates=("{}",), prompts=["a", "b"],
                        prompt_states=torch.randn(2, 4, 384, generator=g), null_states=torch.zeros(4, 384))
    labels = torch.tensor([0, 1])
    plain = sample_images(base, labels, steps=6, generator=torch.Generator().manual_seed(1))
    apply_encoder_cache(base.unet, EncoderCacheConfig(stride=1))  # every step is a key step: no reuse
    try:
        same = sample_images(base, labels, steps=6, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)
    finally:
        remove_encoder_cache(base.unet)
    apply_encoder_cache(base.unet, EncoderCacheConfig(stride=3))
    try:
        for _ in range(2):  # a second run must start fresh
            cached = sample_images(base, labels, steps=6, generator=torch.Generator().manual_seed(1))
        assert cached.shape == plain.shape and torch.isfinite(cached).all()
        stats = get_cache_stats(base.unet)
        # FD-3 over 6 steps: key steps 0 and 3 run the encoder, in each of the two runs
        assert stats.runs == 2 and stats.unet_calls == 12 and stats.encoder_forwards == 4
    finally:
        remove_encoder_cache(base.unet)
