"""The shipped Fashion-MNIST classifier and the class-agreement metric."""

from __future__ import annotations

import pytest
import torch
from fcr_eval.class_agreement import (
    CLASSIFIER_WEIGHTS,
    FashionMNISTClassifier,
    class_agreement,
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
    with pytest.raises(FileNotFoundError, match="fcr_eval.class_agreement train"):
        load_fashion_mnist_classifier(tmp_path / "none.safetensors")


def test_shipped_weights_are_small_and_accurate():
    assert CLASSIFIER_WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    clf = load_fashion_mnist_classifier()
    assert float(clf.metadata["test_accuracy"]) >= 0.85
    assert "fcr_eval.class_agreement train" in clf.metadata["command"]
    assert len(clf.classes) == 10
    try:
        from fcr_train.embedded import load_fashion_mnist

        x, y = load_fashion_mnist("test")
    except (ImportError, FileNotFoundError):
        pytest.skip("Fashion-MNIST test set not available (apt-get install dataset-fashion-mnist)")
    imgs = torch.from_numpy(x[:500].copy()).float().div(255).unsqueeze(1)
    value, _ = class_agreement(imgs, torch.from_numpy(y[:500]), clf)
    assert value >= 0.85  # real images of the prompted class are recognised
