"""The digit classifier that judges generated images (the paper's CLIP-score stand-in).

The paper scores Flickr30k / HQEdit outputs with CLIP; the digits benchmark scores a
generated 8x8 image by asking a small classifier which digit it shows. The classifier is a
multinomial logistic regression on the 64 quantized pixels (the same level maps the model
writes, see :meth:`mage_cl.vocab.Vocab.quantize`), fitted on the TRAIN images of the
benchmark's global split only, so it never sees a test image. It is deterministic for a
given seed and cached in memory per ``(seed, levels)``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..vocab import Vocab

_CACHE: Dict[Tuple[int, int], "DigitJudge"] = {}


class DigitJudge:
    """Logistic-regression digit classifier on quantized 8x8 level maps.

    Attributes:
        accuracy: accuracy (0-100) on the test images of the global split.
        train_accuracy: accuracy (0-100) on the train images it was fitted on.
    """

    shape = (8, 8)

    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray,
                 test_images: np.ndarray, test_labels: np.ndarray, levels: int) -> None:
        from sklearn.linear_model import LogisticRegression

        self.levels = levels
        self._model = LogisticRegression(C=1.0, max_iter=5000)
        self._model.fit(self._features(train_images), np.asarray(train_labels))
        self.train_accuracy = 100.0 * float(np.mean(self.predict_batch(train_images) == train_labels))
        self.accuracy = 100.0 * float(np.mean(self.predict_batch(test_images) == test_labels))

    def _features(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[1:] != self.shape:
            raise ValueError(f"expected level maps of shape [n, 8, 8], got {arr.shape}")
        return arr.reshape(len(arr), -1) / (self.levels - 1)

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Predicted digit (0-9) for each ``[8, 8]`` level map of ``images`` ``[n, 8, 8]``."""
        return self._model.predict(self._features(images)).astype(np.int64)

    def predict(self, image: np.ndarray) -> int:
        """Predicted digit (0-9) of one ``[8, 8]`` level map."""
        return int(self.predict_batch(np.asarray(image)[None])[0])


def get_judge(seed: int = 0, vocab: Vocab | None = None) -> DigitJudge:
    """The judge fitted on the train images of the global split for ``seed`` (cached)."""
    from .digit_images import global_split, load_digit_levels

    vocab = vocab or Vocab()
    key = (int(seed), vocab.levels)
    if key not in _CACHE:
        images, labels = load_digit_levels(vocab)
        train_idx, test_idx = global_split(seed)
        _CACHE[key] = DigitJudge(images[train_idx], labels[train_idx],
                                 images[test_idx], labels[test_idx], vocab.levels)
    return _CACHE[key]
