"""Figures and tables of the emoji backbone's docs (docs/emoji-backbone/README.md), from the shipped
weights and their records:

    uv run --no-sync python docs/emoji-backbone/figures.py            # writes into docs/emoji-backbone/

* ``vae_reconstructions.png``: held-out emoji, per Unicode group the renders and the VAE's
  reconstructions (posterior mean, decoded);
* ``vae_loss.png``: the VAE's training curve (L1, MSE, KL per latent dimension) from ``history.json``;
* ``unet_loss.png``: the UNet's denoising loss from its run's ``metrics.jsonl`` (when the run folder is here);
* ``figures.json``: held-out reconstruction error per group (mean MSE, PSNR, 95 % intervals over
  images), the group classifier's per-group recall on the held-out split's real renders, and the
  shipped UNet's held-out prompt adherence: one DDIM-20 sample (CFG 2.0, seed 0) per held-out name,
  judged by the same classifier, beside the same classifier on the renders of those names (the
  ceiling the measure allows) — ``--no-samples`` leaves it out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def _mean_ci(x: np.ndarray) -> list[float]:
    m = float(x.mean())
    h = float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return [m, m - h, m + h]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fcr_eval.metrics.emoji_groups import balanced_accuracy, load_emoji_group_classifier
    from fcr_train.emoji import EMOJI_GROUPS, load_emoji_set
    from fcr_train.emoji_backbone import (
        EMOJI_WEIGHTS_DIR,
        load_emoji_vae,
        reconstruction_error,
        save_image_rows,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--unet-run", default="runs/pretrain-emoji", help="the UNet's pretraining run folder")
    p.add_argument("--no-samples", dest="samples", action="store_false",
                   help="leave out the UNet's held-out prompt adherence (566 DDIM-20 samples)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_emoji_set()
    vae = load_emoji_vae()
    err = reconstruction_error(vae, data.images("test"))
    labels = data.labels("test")
    rows, names = [], []
    for c, g in enumerate(EMOJI_GROUPS):
        pick = np.nonzero(labels == c)[0]
        pick = pick[np.linspace(0, len(pick) - 1, min(10, len(pick))).round().astype(int)]
        rows += [err["images"][pick], err["reconstructions"][pick]]
        names += [f"{g[:11]} real", "  VAE recon."]
    save_image_rows(rows, names, out / "vae_reconstructions.png",
                    title=f"held-out emoji and their VAE reconstructions (MSE {float(err['mse'].mean()):.4f}, "
                          f"PSNR {float(err['psnr'].mean()):.1f} dB over {len(labels)} images)")
    per_group = {g: {"n": int((labels == c).sum()), "mse": _mean_ci(err["mse"][labels == c].numpy()),
                     "psnr_db": _mean_ci(err["psnr"][labels == c].numpy())} for c, g in enumerate(EMOJI_GROUPS)}

    hist = json.loads((EMOJI_WEIGHTS_DIR / "vae" / "history.json").read_text())
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in hist]
    ax[0].plot(steps, [h["l1"] for h in hist], label="L1")
    ax[0].plot(steps, [h["mse"] for h in hist], label="MSE")
    ax[0].set_yscale("log"), ax[0].set_xlabel("step"), ax[0].legend(), ax[0].set_title("VAE reconstruction (train)")
    ax[1].plot(steps, [h["kl_per_dim"] for h in hist])
    ax[1].set_xlabel("step"), ax[1].set_title("KL per latent dimension")
    fig.tight_layout()
    fig.savefig(out / "vae_loss.png", dpi=110)
    plt.close(fig)

    run = Path(a.unet_run) / "metrics.jsonl"
    if run.is_file():
        logs = [json.loads(x) for x in run.read_text().splitlines()]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        s = np.array([x["step"] for x in logs])
        loss = np.array([x["l_denoise"] for x in logs])
        k = min(25, len(loss))
        ax.plot(s, loss, alpha=0.3, label="per step")
        ax.plot(s[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label=f"mean of {k}")
        ax.set_xlabel("step"), ax.set_ylabel("L_denoise (ε MSE)"), ax.set_yscale("log"), ax.legend()
        ax.set_title("latent UNet pretraining")
        fig.tight_layout()
        fig.savefig(out / "unet_loss.png", dpi=110)
        plt.close(fig)

    clf = load_emoji_group_classifier()
    x = err["images"]
    with torch.no_grad():
        pred = clf(x).argmax(1)
    y = torch.from_numpy(labels)
    recall = {g: float((pred[y == c] == c).float().mean()) for c, g in enumerate(EMOJI_GROUPS)}
    record = {
        "vae_held_out": {"n": len(labels), "mse": _mean_ci(err["mse"].numpy()), "psnr_db": _mean_ci(err["psnr"].numpy()),
                         "per_group": per_group},
        "classifier_held_out": {"accuracy": float((pred == y).float().mean()),
                                "balanced_accuracy": balanced_accuracy(pred, y, len(EMOJI_GROUPS)),
                                "recall_per_group": recall, "metadata": clf.metadata},
    }
    if a.samples:
        record["unet_held_out_adherence"] = _unet_adherence(clf, y, pred)
    (out / "figures.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record["vae_held_out"].items() if k != "per_group"}),
          json.dumps({k: v for k, v in record["classifier_held_out"].items() if k != "metadata"}),
          json.dumps(record.get("unet_held_out_adherence", {})))


def _unet_adherence(clf, labels: torch.Tensor, pred_real: torch.Tensor, batch: int = 64) -> dict:
    """One sample per held-out name (DDIM-20, CFG 2.0, seed 0), classified; with a paired 95 %
    interval (over names) of sample accuracy minus the renders' accuracy, and chance for reference."""
    from fcr_eval.metrics.emoji_groups import balanced_accuracy
    from fcr_train.emoji import EMOJI_GROUPS
    from fcr_train.emoji_backbone import load_emoji_base, sample_emoji
    from tqdm import tqdm

    base = load_emoji_base()
    idx = torch.as_tensor(base.data.indices("test"))
    g = torch.Generator().manual_seed(0)
    preds = []
    for i in tqdm(range(0, len(idx), batch), desc="held-out samples", unit="batch"):
        imgs = sample_emoji(base, idx[i : i + batch], steps=20, guidance_scale=2.0, generator=g)
        with torch.no_grad():
            preds.append(clf(imgs).argmax(1))
    pred = torch.cat(preds)
    hit, hit_real = (pred == labels).float().numpy(), (pred_real == labels).float().numpy()
    counts = torch.bincount(labels, minlength=len(EMOJI_GROUPS)).float()
    return {
        "n": len(labels), "sampler": "DDIM-20, CFG 2.0, seed 0, one sample per held-out name",
        "accuracy": _mean_ci(hit), "balanced_accuracy": balanced_accuracy(pred, labels, len(EMOJI_GROUPS)),
        "renders_accuracy": float(hit_real.mean()),
        "samples_minus_renders": _mean_ci(hit - hit_real),
        "majority_class_share": float(counts.max() / counts.sum()),
        "recall_per_group": {gname: float((pred[labels == c] == c).float().mean()) for c, gname in enumerate(EMOJI_GROUPS)},
    }


if __name__ == "__main__":
    main()
