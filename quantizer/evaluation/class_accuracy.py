"""Does a class-conditional model draw the class it is asked for? The project classifier is the judge.

FD alone cannot tell: a model that ignores its labels but draws good clothes still scores well, since the
balanced label set has the test split's class mix. Class accuracy is the fraction of generated images that the
classifier (91% on real test images: the ceiling is about there) assigns to the requested class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassAccuracy:
    accuracy: float  # over every image
    per_class: tuple[float, ...]  # accuracy of the images requested as class c (nan for a class never requested)
    confusion: tuple[tuple[int, ...], ...]  # confusion[requested][predicted], image counts

    def as_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "per_class": [round(a, 4) for a in self.per_class]}


def balanced_labels(seeds: list[int], num_classes: int) -> list[int]:
    """The label of each seed, seed % num_classes: N seeds in a row cover every class N/num_classes times, and an
    image's label depends on its seed alone (so it is the same whatever batch or subset it is drawn in)."""
    return [seed % num_classes for seed in seeds]


@torch.no_grad()
def class_accuracy(classifier: torch.nn.Module, samples: torch.Tensor, labels: torch.Tensor | list[int],
                   num_classes: int = 10, batch_size: int = 500) -> ClassAccuracy:
    """How often the classifier's argmax on `samples` (model space, N x C x H x W) equals the requested `labels`."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(samples) or len(samples) == 0:
        raise ValueError(f"need one label per sample and at least one sample, got {len(labels)} and {len(samples)}")
    classifier.eval()
    predicted = torch.cat([classifier(samples[i:i + batch_size].float()).argmax(1)
                           for i in range(0, len(samples), batch_size)])
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    requested = confusion.sum(1)
    per_class = tuple(float(confusion[c, c] / requested[c]) if requested[c] else float("nan")
                      for c in range(num_classes))
    return ClassAccuracy(accuracy=float((predicted == labels).float().mean()), per_class=per_class,
                         confusion=tuple(tuple(int(v) for v in row) for row in confusion))
