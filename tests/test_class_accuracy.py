from __future__ import annotations

import math

import pytest
import torch

from quantizer.evaluation.class_accuracy import balanced_labels, class_accuracy


class _ReadsPixels(torch.nn.Module):
    """A stand-in classifier: the logits are the first 3 pixels of the image, so a test picks each prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


def _images(predicted: list[int]) -> torch.Tensor:
    x = torch.zeros(len(predicted), 1, 2, 2)
    x.view(len(predicted), -1)[torch.arange(len(predicted)), torch.tensor(predicted)] = 1.0
    return x


def test_class_accuracy_counts_agreement_per_requested_class():
    requested = [0, 0, 1, 1, 1, 0]
    result = class_accuracy(_ReadsPixels(), _images([0, 1, 1, 1, 2, 0]), requested, num_classes=3, batch_size=4)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.per_class[:2] == pytest.approx((2 / 3, 2 / 3)) and math.isnan(result.per_class[2])
    assert result.confusion == ((2, 1, 0), (0, 2, 1), (0, 0, 0))
    assert result.as_dict()["accuracy"] == 0.6667


def test_class_accuracy_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one label per sample"):
        class_accuracy(_ReadsPixels(), _images([0, 1]), [0], num_classes=3)


def test_balanced_labels_depend_on_the_seed_alone():
    assert balanced_labels(list(range(12)), 10) == [*range(10), 0, 1]
    assert balanced_labels([13, 27], 10) == [3, 7]
