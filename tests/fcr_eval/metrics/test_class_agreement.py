"""The shipped Fashion-MNIST classifier and the class-agreement metric."""

from __future__ import annotations

import math

import pytest
import torch
from fcr_eval.metrics.class_agreement import (
    CLASS_CORRECT,
    CLASS_LOGPROB,
    CLASSIFIER_WEIGHTS,
    FashionMNISTClassifier,
    class_agreement,
    class_scores,
    load_fashion_mnist_classifier,
)


def test_agreement_counts_hits():
    class Fixed(FashionMNISTClassifier):
        def forward(self, images):  # predicts class = round(mean brightness * 9)
            return torch.nn.functional.one_hot((images.mean((1, 2, 3)) * 9).round().long(), 10).float()

    imgs = torch.stack([torch.full((1, 28, 28), c / 9) for c in range(10)])
    labels = torch.arange(10)
    labels[3] = 4
    value, hits = class_agreement(imgs, labels, Fixed())
    assert value == pytest.approx(0.9) and hits.tolist() == [1.0] * 3 + [0.0] + [1.0] * 6


def test_shape_errors_and_missing_weights(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        FashionMNISTClassifier()(torch.rand(2, 3, 28, 28))
    with pytest.raises(FileNotFoundError, match="fcr_eval.metrics.class_agreement train"):
        load_fashion_mnist_classifier(tmp_path / "none.safetensors")


def test_shipped_weights_are_small_and_accurate():
    assert CLASSIFIER_WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    clf = load_fashion_mnist_classifier()
    assert float(clf.metadata["test_accuracy"]) >= 0.85
    assert "class_agreement train" in clf.metadata["command"]  # as recorded when made (module since moved)
    assert len(clf.classes) == 10
    try:
        from fcr_train.embedded import load_fashion_mnist

        x, y = load_fashion_mnist("test")
    except (ImportError, FileNotFoundError):
        pytest.skip("Fashion-MNIST test set not available (apt-get install dataset-fashion-mnist)")
    imgs = torch.from_numpy(x[:500].copy()).float().div(255).unsqueeze(1)
    value, _ = class_agreement(imgs, torch.from_numpy(y[:500]), clf)
    assert value >= 0.85  # real images of the prompted class are recognised


def test_class_scores_per_sample_correctness_and_logprob():
    class Fixed(FashionMNISTClassifier):
        def forward(self, images):  # logits: log 0.7 for class 2, log(0.3/9) for the others
            n = images.shape[0]
            logits = torch.full((n, 10), float(torch.log(torch.tensor(0.3 / 9))))
            logits[:, 2] = float(torch.log(torch.tensor(0.7)))
            return logits

    imgs = torch.rand(3, 1, 28, 28)
    s = class_scores(imgs, torch.tensor([2, 5, 2]), Fixed())
    assert s[CLASS_CORRECT].tolist() == [1.0, 0.0, 1.0]
    assert s[CLASS_LOGPROB].tolist() == pytest.approx([math.log(0.7), math.log(0.3 / 9), math.log(0.7)], rel=1e-5)
    assert float(s[CLASS_CORRECT].mean()) == pytest.approx(class_agreement(imgs, torch.tensor([2, 5, 2]), Fixed())[0])
    with pytest.raises(ValueError, match="class indices"):
        class_scores(imgs, torch.tensor([2, 5, 10]), Fixed())
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        class_scores(imgs, torch.tensor([2, 5]), Fixed())
