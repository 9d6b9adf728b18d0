"""Intra-list diversity: hand-computed values on tiny lists."""

import numpy as np
import pytest

from training.eval.diversity import category_diversity, embedding_diversity


def test_embedding_diversity_identical_and_orthogonal() -> None:
    vecs = np.array([[0, 0], [1, 0], [2, 0], [0, 3]], dtype=np.float32)  # row 0 padding
    # items 1 and 2 point the same way (distance 0); 1 and 3 are orthogonal (distance 1)
    assert embedding_diversity(np.array([[1, 2]]), vecs) == pytest.approx(0.0)
    assert embedding_diversity(np.array([[1, 3]]), vecs) == pytest.approx(1.0)
    # pairs (1,2)=0, (1,3)=1, (2,3)=1 -> 2/3; second list 1.0 -> mean 5/6
    assert embedding_diversity(np.array([[1, 2, 3], [1, 3, 0]]), vecs) == pytest.approx((2 / 3 + 1.0) / 2)


def test_embedding_diversity_skips_padding_and_single_item_lists() -> None:
    vecs = np.array([[0, 0], [1, 0], [0, 1]], dtype=np.float32)
    # the one-item list has no pair and is left out of the mean
    assert embedding_diversity(np.array([[1, 2], [1, 0]]), vecs) == pytest.approx(1.0)


def test_category_diversity_jaccard() -> None:
    # codes layout: item 1 {a}, item 2 {a, b}, item 3 {c}, item 4 no category
    codes = np.array([[0, 0], [1, 0], [1, 2], [3, 0], [0, 0]])
    assert category_diversity(np.array([[1, 2]]), codes) == pytest.approx(0.5)
    assert category_diversity(np.array([[1, 3]]), codes) == pytest.approx(1.0)
    assert category_diversity(np.array([[4, 4]]), codes) == pytest.approx(0.0)
    hot = np.zeros((5, 4), dtype=bool)
    hot[1, 1] = hot[2, 1] = hot[2, 2] = hot[3, 3] = True
    assert category_diversity(np.array([[1, 2, 3]]), hot) == pytest.approx((0.5 + 1 + 1) / 3)
