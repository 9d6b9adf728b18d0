"""Early stopping on a validation score, with the best weights kept (one rule for every loop).

Patience means one thing everywhere: training stops at the first epoch that is `patience`
epochs past the best one without beating it (0 and 1 both stop at the first epoch that does not
improve); the best weights are restored at the end.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EarlyStopping:
    """Best score, its epoch and a copy of its weights (higher scores are better).

    `score`: the score of the weights as given (epoch 0, e.g. a residual model that starts at the
    upstream order and must beat it to be kept); -inf when there is none, so epoch 1 always wins.
    """

    def __init__(self, model: nn.Module, patience: int, score: float = -math.inf) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.model = model
        self.patience = patience
        self.best = score
        self.best_epoch = 0
        self._state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch`'s score; True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch, self._state = score, epoch, copy.deepcopy(self.model.state_dict())
            return False
        return epoch - self.best_epoch >= self.patience

    def restore(self) -> None:
        """Load the best weights back into the model."""
        self.model.load_state_dict(self._state)
