"""Classification metrics from a confusion matrix, and its picture.

    cm[i, j] = how many examples of true class i were predicted as class j
    precision_j = cm[j, j] / column j     recall_i = cm[i, i] / row i     F1 = harmonic mean of the two
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(true labels (N,), class probabilities (N, C)) over batches of ember.data.cls.cls_batch."""
    from ember.train.loss import pooled_logits

    model.eval()
    labels, probs = [], []
    for batch in batches:
        labels.append(batch["labels"])
        probs.append(pooled_logits(model, batch).float().softmax(-1))
    return torch.cat(labels), torch.cat(probs)


def confusion(labels: torch.Tensor, predicted: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(labels * n + predicted, minlength=n * n).view(n, n)


def report(cm: torch.Tensor, names: list[str]) -> dict:
    """{"accuracy", "per_class": {name: {"precision", "recall", "f1", "support"}}, "macro_f1", "confusion"}."""
    cm = cm.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    per = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                  "support": int(cm[i].sum())} for i, name in enumerate(names)}
    return {"accuracy": float(tp.sum() / cm.sum().clamp(min=1)), "macro_f1": float(f1.mean()), "per_class": per,
            "confusion": cm.long().tolist(), "labels": names}


def plot_confusion(cm: torch.Tensor, names: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    top = int(cm.max()) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
