"""Prompt adherence on the emoji backbone: a classifier of Unicode emoji groups.

On the emoji backbone a prompt is an emoji's name (``"grinning face"``, ``"flag: Japan"``) and its
class is the name's Unicode group (9 groups: ``fcr_train.vocabulary.EMOJI_GROUPS``). A generated
image adheres to its prompt, at the level this metric can judge, when a classifier trained on the
real rendered emoji assigns it the prompted group. It is stored as ``class_correct`` /
``class_logprob`` / ``class_agreement`` with feature extractor :data:`FEATURE_EXTRACTOR_NAME` —
*not* CLIPScore, and coarser than the caption: it checks "a face", "a flag", "an animal or plant",
not which face.

The shipped weights (``weights/emoji_group_classifier.safetensors``) record in their metadata the
command, seed, torch version, the held-out split's accuracy and balanced accuracy (mean recall
over groups: the groups are unbalanced, People & Body is 58 % of the images) and the majority-
class accuracy to beat. They were made with::

    uv run python -m fcr_eval.metrics.emoji_groups train --epochs 30 --seed 0

Example:
    >>> clf = load_emoji_group_classifier()
    >>> scores = class_scores(images, labels, clf)   # fcr_eval.metrics.class_agreement.class_scores
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fcr_eval.metrics.class_agreement import class_agreement

__all__ = ["EmojiGroupClassifier", "EMOJI_CLASSIFIER_WEIGHTS", "FEATURE_EXTRACTOR_NAME", "PREPROCESSING",
           "load_emoji_group_classifier", "train_emoji_group_classifier", "balanced_accuracy"]

logger = logging.getLogger(__name__)

EMOJI_CLASSIFIER_WEIGHTS = Path(__file__).parent / "weights" / "emoji_group_classifier.safetensors"
FEATURE_EXTRACTOR_NAME = "emoji_group_cnn"
PREPROCESSING = "rgb_32x32_[0,1]->[-1,1]"


class EmojiGroupClassifier(nn.Module):
    """Small CNN: 32×32 RGB in [0, 1] → logits over the emoji groups.

    Example:
        >>> EmojiGroupClassifier()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 9])
    """

    def __init__(self, num_classes: int = 9) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 32), block(32, 32), nn.MaxPool2d(2),  # 16x16
            block(32, 64), block(64, 64), nn.MaxPool2d(2),  # 8x8
            block(64, 128), nn.MaxPool2d(2),  # 4x4
            block(128, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (32, 32):
            raise ValueError(f"EmojiGroupClassifier expects (N, 3, 32, 32) RGB in [0, 1], got {tuple(images.shape)}")
        return self.head(self.features(images.float() * 2 - 1))


def load_emoji_group_classifier(path: str | Path | None = None, device: str | torch.device = "cpu"
                                ) -> EmojiGroupClassifier:
    """The shipped classifier (or ``path``) in eval mode; its metadata is on ``.metadata``.

    Raises:
        FileNotFoundError: the weights file is missing, with the command that makes it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path else EMOJI_CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"emoji group classifier weights not found at {path}; train them with "
                                "`uv run python -m fcr_eval.metrics.emoji_groups train`")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    classes = json.loads(meta.get("classes", "[]"))
    model = EmojiGroupClassifier(num_classes=len(classes) or 9)
    model.load_state_dict(load_file(str(path)))
    model.eval().to(device)
    model.metadata = meta  # type: ignore[attr-defined]
    model.classes = tuple(classes)  # type: ignore[attr-defined]
    return model


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present of each class's recall."""
    recalls = [float((pred[labels == c] == c).float().mean()) for c in range(num_classes) if (labels == c).any()]
    return sum(recalls) / len(recalls)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to 3 px (white fill), horizontal flips, and a blur on half the batch: generated
    images are softer than the renders, and the classifier must judge the group, not the sharpness."""
    n = len(x)
    pad = F.pad(x, (3, 3, 3, 3), value=1.0)
    dx, dy = torch.randint(0, 7, (2,), generator=gen).tolist()
    x = pad[..., dy : dy + 32, dx : dx + 32]
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    blur = torch.rand(n, generator=gen) < 0.5
    return torch.where(blur[:, None, None, None], blurred, x)


def train_emoji_group_classifier(out: str | Path = EMOJI_CLASSIFIER_WEIGHTS, *, epochs: int = 30, seed: int = 0,
                                 batch_size: int = 64, lr: float = 3e-3, command: str = "") -> dict:
    """Train on the emoji training split (class-weighted cross-entropy), save safetensors with
    metadata, return the held-out figures."""
    from fcr_train.emoji import EMOJI_GROUPS, load_emoji_set
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = load_emoji_set()
    xtr = torch.from_numpy(data.images("train")).permute(0, 3, 1, 2).float().div(255)
    xte = torch.from_numpy(data.images("test")).permute(0, 3, 1, 2).float().div(255)
    ytr, yte = torch.from_numpy(data.labels("train")), torch.from_numpy(data.labels("test"))
    k = len(EMOJI_GROUPS)
    counts = torch.bincount(ytr, minlength=k).float()
    weight = counts.sum() / (k * counts.clamp_min(1))
    model = EmojiGroupClassifier(k)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    per_epoch = len(xtr) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], gen)), ytr[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc, _ = class_agreement(xte, yte, model)
        logger.info("epoch %d/%d: loss %.3f, held-out accuracy %.4f (%.0f s)", epoch + 1, epochs, loss.item(), acc,
                    time.time() - t0)
    with torch.no_grad():
        pred = model(xte).argmax(1)
    acc = float((pred == yte).float().mean())
    bal = balanced_accuracy(pred, yte, k)
    majority = float((yte == torch.bincount(ytr).argmax()).float().mean())
    meta = {
        "classes": json.dumps(list(EMOJI_GROUPS)),
        "test_accuracy": f"{acc:.4f}",
        "test_balanced_accuracy": f"{bal:.4f}",
        "test_majority_class_accuracy": f"{majority:.4f}",
        "n_test": str(len(xte)),
        "n_train": str(len(xtr)),
        "epochs": str(epochs),
        "seed": str(seed),
        "torch": torch.__version__,
        "wall_time_s": f"{time.time() - t0:.0f}",
        "data": json.dumps(data.source),
        "command": command or f"uv run python -m fcr_eval.metrics.emoji_groups train --epochs {epochs} --seed {seed}",
        "preprocessing": PREPROCESSING,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k_: v.contiguous() for k_, v in model.state_dict().items()}, str(out), metadata=meta)
    logger.info("saved %s: held-out accuracy %.4f, balanced %.4f (majority class %.4f)", out, acc, bal, majority)
    return {"accuracy": acc, "balanced_accuracy": bal, "majority_accuracy": majority, "n_test": len(xte),
            "wall_time_s": time.time() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fcr_eval.metrics.emoji_groups", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the emoji group classifier and save its weights")
    t.add_argument("--out", default=str(EMOJI_CLASSIFIER_WEIGHTS))
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = f"uv run python -m fcr_eval.metrics.emoji_groups train --epochs {a.epochs} --seed {a.seed}"
    r = train_emoji_group_classifier(a.out, epochs=a.epochs, seed=a.seed, command=cmd)
    print(f"held-out accuracy {r['accuracy']:.4f}, balanced {r['balanced_accuracy']:.4f} "
          f"(majority class {r['majority_accuracy']:.4f}, n = {r['n_test']}) -> {a.out}")


if __name__ == "__main__":
    main()
