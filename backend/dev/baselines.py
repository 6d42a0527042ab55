"""Plain baselines that every quality claim is measured against (benchmarks and quality tests).

* ``tiny_cnn_accuracy``: a 3-layer CNN in plain torch with a fixed recipe (AdamW 3e-3, 60 epochs,
  batch 32, flips and 90° turns) — what an ML engineer writes in ten minutes for small images.
* ``hog_logreg_accuracy``: HOG features + logistic regression (scikit-learn).
* ``logreg_probabilities``: out-of-sample class probabilities from HOG + logistic regression, the
  input cleanlab expects, for mislabel-ranking baselines.

None of this serves users; it exists so that "ours is better" always has a number beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _load(paths: Sequence[Path | str], size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 images, resized to a square."""
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
    return out


def tiny_cnn_accuracy(train_paths: Sequence[Path], train_labels: Sequence[str], test_paths: Sequence[Path],
                      test_labels: Sequence[str], *, size: int = 64, epochs: int = 60, seed: int = 0) -> float:
    """Test accuracy of the fixed-recipe tiny CNN trained on (train_paths, train_labels)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    classes = sorted(set(train_labels) | set(test_labels))
    index = {c: i for i, c in enumerate(classes)}
    x = torch.from_numpy(_load(train_paths, size)).permute(0, 3, 1, 2).float() / 255
    y = torch.tensor([index[c] for c in train_labels])
    xt = torch.from_numpy(_load(test_paths, size)).permute(0, 3, 1, 2).float() / 255
    yt = torch.tensor([index[c] for c in test_labels])

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, len(classes)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            idx = order[start : start + 32]
            if len(idx) < 2:
                continue
            batch = x[idx]
            if torch.rand(1, generator=generator) < 0.5:
                batch = batch.flip(3)
            if torch.rand(1, generator=generator) < 0.5:
                batch = batch.flip(2)
            batch = torch.rot90(batch, int(torch.randint(4, (1,), generator=generator)), (2, 3))
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(xt[s : s + 256]).argmax(1) for s in range(0, len(xt), 256)])
    return float((predicted == yt).float().mean())


def hog_features(paths: Sequence[Path | str], size: int = 64) -> np.ndarray:
    """Histogram-of-oriented-gradients vectors (skimage), one row per image."""
    from skimage.feature import hog

    images = _load(paths, size)
    return np.stack([hog(img.mean(axis=2), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
                     for img in images])


def hog_logreg_accuracy(train_paths: Sequence[Path], train_labels: Sequence[str], test_paths: Sequence[Path],
                        test_labels: Sequence[str], *, size: int = 64) -> float:
    """Test accuracy of logistic regression on HOG features."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000).fit(hog_features(train_paths, size), list(train_labels))
    return float(np.mean(model.predict(hog_features(test_paths, size)) == np.asarray(test_labels)))


def logreg_probabilities(paths: Sequence[Path], labels: Sequence[str], classes: Sequence[str], *, folds: int = 3,
                         size: int = 64, seed: int = 0) -> np.ndarray:
    """Out-of-sample (K-fold) class probabilities of HOG + logistic regression, columns in ``classes`` order."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    features = hog_features(paths, size)
    y = np.array([list(classes).index(c) for c in labels])
    return cross_val_predict(LogisticRegression(max_iter=2000), features, y, cv=folds, method="predict_proba")
