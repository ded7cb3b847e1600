"""The 1797 real 8x8 handwritten digits that scikit-learn ships, and the one train/test split.

Every digits task (:mod:`mage_cl.tasks.digits`), the image judge
(:mod:`mage_cl.tasks.judge_classifier`) and the base model's pretraining mixture read the
images from here, so no test image of any task is ever seen in training.
"""

from __future__ import annotations

import functools
from typing import Tuple

import numpy as np

from ..vocab import Vocab

__all__ = ["TEST_FRACTION", "load_digit_levels", "global_split"]

#: Fraction of the 1797 images held out for testing (stratified by class).
TEST_FRACTION = 0.25


@functools.lru_cache(maxsize=1)
def _raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.asarray(d.images, dtype=np.float64)
    images.setflags(write=False)
    labels = np.asarray(d.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=8)
def _levels_cached(levels: int) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = _raw_digits()
    q = Vocab(levels).quantize(images)
    q.setflags(write=False)
    return q, labels


def load_digit_levels(vocab: Vocab) -> Tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as level maps ``[1797, 8, 8]`` (int) and their labels ``[1797]`` (read-only)."""
    return _levels_cached(vocab.levels)


@functools.lru_cache(maxsize=16)
def _split_cached(seed: int) -> Tuple[np.ndarray, np.ndarray]:
    _, labels = _raw_digits()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(TEST_FRACTION * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    tr.setflags(write=False)
    te.setflags(write=False)
    return tr, te


def global_split(seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``(train_indices, test_indices)`` into the 1797 digits: the one split every task uses."""
    return _split_cached(int(seed))
