"""Early stopping on a validation score, with the best weights kept (one rule for every loop).

Patience means one thing everywhere: training stops at the first epoch that is `patience`
epochs past the best one without beating it (0 and 1 both stop at the first epoch that does not
improve); the best weights are restored at the end.

With `keep` > 1 the weights of the `keep` best-scoring epochs are kept, and `averaged()` gives
their uniform average (checkpoint averaging: Vaswani et al. 2017 average their last checkpoints;
Izmailov et al. 2018, SWA, the iterates of a constant learning rate). Whether the average
replaces the best epoch is the caller's decision, on the same validation score
(training/trainer.fit).
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
    `keep`: how many of the best epochs' weights to keep for `averaged` (1: the best alone).
    """

    def __init__(self, model: nn.Module, patience: int, score: float = -math.inf, keep: int = 1) -> None:
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model = model
        self.patience = patience
        self.keep = keep
        self.best = score
        self.best_epoch = 0
        self._state: dict[str, torch.Tensor] = copy.deepcopy(model.state_dict())
        self._top: list[tuple[float, int, dict[str, torch.Tensor]]] = []  # (score, epoch, weights), best first

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch `epoch`'s score; True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch, self._state = score, epoch, copy.deepcopy(self.model.state_dict())
            self._remember(epoch, score, self._state)
            return False
        self._remember(epoch, score, None)
        return epoch - self.best_epoch >= self.patience

    def _remember(self, epoch: int, score: float, state: dict[str, torch.Tensor] | None) -> None:
        if self.keep == 1 or not math.isfinite(score):
            return
        if len(self._top) == self.keep and score <= self._top[-1][0]:
            return
        kept = state if state is not None else copy.deepcopy(self.model.state_dict())
        self._top.append((score, epoch, kept))
        self._top.sort(key=lambda t: (-t[0], t[1]))  # best first; an earlier epoch wins a tie
        del self._top[self.keep :]

    @property
    def kept_epochs(self) -> list[int]:
        """The epochs `averaged` averages, best first."""
        return [epoch for _, epoch, _ in self._top]

    def averaged(self) -> dict[str, torch.Tensor] | None:
        """The uniform average of the kept epochs' weights (integer tensors from the best epoch);
        None with fewer than two epochs kept."""
        if len(self._top) < 2:
            return None
        states = [state for _, _, state in self._top]
        out: dict[str, torch.Tensor] = {}
        for name, best in states[0].items():
            if best.is_floating_point():
                out[name] = torch.stack([s[name] for s in states]).mean(dim=0).to(best.dtype)
            else:
                out[name] = best.clone()
        return out

    def restore(self) -> None:
        """Load the best weights back into the model."""
        self.model.load_state_dict(self._state)
