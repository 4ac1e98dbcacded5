"""Prompt–class agreement on the embedded default: a small Fashion-MNIST classifier.

On the embedded default prompts are Fashion-MNIST class names through templates, so text–image
alignment is measured by asking a classifier trained on real Fashion-MNIST whether a generated
image shows the prompted class. The metric is stored as ``class_agreement`` with feature
extractor ``fashion_mnist_cnn`` — it is *not* CLIPScore.

The shipped weights (``weights/fashion_mnist_classifier.safetensors``, 242 kB, 61k parameters;
test accuracy 0.895 on the 10k Fashion-MNIST test images) were made with::

    uv run python -m fcr_eval.metrics.class_agreement train --epochs 4 --seed 0

on the Debian package ``dataset-fashion-mnist``; the file's metadata records that command, the
seed, the torch version and the test accuracy. Training takes about 2 minutes per epoch on 2 idle
CPU cores.

Example:
    >>> clf = load_fashion_mnist_classifier()
    >>> agreement, per_image = class_agreement(images, labels, clf)   # images (N,1,28,28) in [0,1]
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

__all__ = [
    "FashionMNISTClassifier",
    "CLASSIFIER_WEIGHTS",
    "FEATURE_EXTRACTOR_NAME",
    "PREPROCESSING",
    "load_fashion_mnist_classifier",
    "class_agreement",
    "class_scores",
    "CLASS_CORRECT",
    "CLASS_LOGPROB",
    "train_fashion_mnist_classifier",
]

logger = logging.getLogger(__name__)

CLASSIFIER_WEIGHTS = Path(__file__).parent / "weights" / "fashion_mnist_classifier.safetensors"
FEATURE_EXTRACTOR_NAME = "fashion_mnist_cnn"
PREPROCESSING = "gray_28x28_[0,1]->[-1,1]"
# Per-sample metric names, owned by the torch-free vocabulary (:data:`fcr_eval.spec.vocabulary.SAMPLE_METRICS`).
from fcr_eval.spec.vocabulary import CLASS_CORRECT, CLASS_LOGPROB  # noqa: E402


class FashionMNISTClassifier(nn.Module):
    """Tiny CNN (61k parameters): 28×28 grayscale in [0, 1] → 10 logits.

    Example:
        >>> FashionMNISTClassifier()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 16), block(16, 32), nn.MaxPool2d(2),  # 14x14
            block(32, 64), nn.MaxPool2d(2),  # 7x7
            block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] != (28, 28):
            raise ValueError(
                f"FashionMNISTClassifier expects (N, 1, 28, 28) grayscale in [0, 1], got {tuple(images.shape)}"
            )
        return self.head(self.features(images.float() * 2 - 1))


def load_fashion_mnist_classifier(path: str | Path | None = None, device: str | torch.device = "cpu"
                                  ) -> FashionMNISTClassifier:
    """Load the shipped classifier (or ``path``), in eval mode. Its metadata is on ``.metadata``.

    Raises:
        FileNotFoundError: the weights file is missing, with the command that makes it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path else CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST classifier weights not found at {path}; train them with "
            "`uv run python -m fcr_eval.metrics.class_agreement train` (needs `apt-get install dataset-fashion-mnist`)"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    classes = json.loads(meta.get("classes", "[]")) or None
    model = FashionMNISTClassifier(num_classes=len(classes) if classes else 10)
    model.load_state_dict(load_file(str(path)))
    model.eval().to(device)
    model.metadata = meta  # type: ignore[attr-defined]
    model.classes = tuple(classes) if classes else None  # type: ignore[attr-defined]
    return model


def _check_labels(images: torch.Tensor, labels) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().cpu()
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return labels


@torch.no_grad()
def _logits(images: torch.Tensor, clf: FashionMNISTClassifier, batch_size: int) -> torch.Tensor:
    device = next(clf.parameters()).device
    return torch.cat([clf(images[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def class_agreement(images: torch.Tensor, labels: torch.Tensor, classifier: FashionMNISTClassifier | None = None,
                    batch_size: int = 256) -> tuple[float, torch.Tensor]:
    """Fraction of images the classifier assigns to their prompted class, and per-image 0/1.

    Args:
        images: ``(N, 1, 28, 28)`` in [0, 1] (the embedded sampler's output).
        labels: ``(N,)`` prompted class indices.
        classifier: defaults to the shipped one.

    Example:
        >>> value, per_image = class_agreement(imgs, torch.arange(10))
    """
    clf = classifier or load_fashion_mnist_classifier()
    labels = _check_labels(images, labels)
    hits = (_logits(images, clf, batch_size).argmax(1) == labels).float()
    return float(hits.mean()), hits


def class_scores(images: torch.Tensor, labels: torch.Tensor, classifier: FashionMNISTClassifier | None = None,
                 batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-sample scores of the prompted class: correctness (0/1) and its log-probability.

    These pair across variations (same x_T and prompt), so a contrast of class agreement can be
    a paired difference with a CI instead of a difference of two set fractions.

    Args:
        images: ``(N, 1, 28, 28)`` in [0, 1]; labels: ``(N,)`` prompted class indices.
        classifier: defaults to the shipped one.

    Returns:
        ``{"class_correct": (N,) float 0/1, "class_logprob": (N,) float ≤ 0}``.

    Example:
        >>> s = class_scores(imgs, labels); float(s["class_correct"].mean())   # = class_agreement
    """
    clf = classifier or load_fashion_mnist_classifier()
    labels = _check_labels(images, labels)
    logits = _logits(images, clf, batch_size)
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1] - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    logprob = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return {CLASS_CORRECT: (logits.argmax(1) == labels).float(), CLASS_LOGPROB: logprob}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 px (robustness to generated images not centred like the data)."""
    pad = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[..., dy : dy + 28, dx : dx + 28]


def train_fashion_mnist_classifier(out: str | Path = CLASSIFIER_WEIGHTS, *, epochs: int = 4, seed: int = 0,
                                   batch_size: int = 128, lr: float = 2e-3, data_dir: str | None = None,
                                   command: str = "") -> float:
    """Train the classifier on Fashion-MNIST train, save safetensors with metadata, return test accuracy."""
    from fcr_train.embedded import FASHION_MNIST_CLASSES, load_fashion_mnist
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xtr, ytr = load_fashion_mnist("train", data_dir)
    xte, yte = load_fashion_mnist("test", data_dir)
    xtr = torch.from_numpy(xtr.copy()).float().div(255).unsqueeze(1)
    xte = torch.from_numpy(xte.copy()).float().div(255).unsqueeze(1)
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    model = FashionMNISTClassifier(len(FASHION_MNIST_CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(xtr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(len(xtr) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        acc, _ = class_agreement(xte, yte, model)
        logger.info("epoch %d/%d: loss %.3f, test accuracy %.4f (%.0f s)", epoch + 1, epochs, loss.item(), acc, time.time() - t0)
    meta = {
        "classes": json.dumps(list(FASHION_MNIST_CLASSES)),
        "test_accuracy": f"{acc:.4f}",
        "n_test": str(len(xte)),
        "epochs": str(epochs),
        "seed": str(seed),
        "torch": torch.__version__,
        "command": command or f"uv run python -m fcr_eval.metrics.class_agreement train --epochs {epochs} --seed {seed}",
        "preprocessing": PREPROCESSING,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata=meta)
    logger.info("saved %s (%.0f kB), test accuracy %.4f", out, out.stat().st_size / 1024, acc)
    return acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fcr_eval.metrics.class_agreement", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the Fashion-MNIST classifier and save its weights")
    t.add_argument("--out", default=str(CLASSIFIER_WEIGHTS))
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cmd = f"uv run python -m fcr_eval.metrics.class_agreement train --epochs {a.epochs} --seed {a.seed}"
    acc = train_fashion_mnist_classifier(a.out, epochs=a.epochs, seed=a.seed, data_dir=a.data_dir, command=cmd)
    print(f"test accuracy {acc:.4f} -> {a.out}")


if __name__ == "__main__":
    main()
