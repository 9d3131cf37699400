"""k-fold assignment that keeps groups whole and classes even: one dealer for every k-fold of the project.

Used by the training worker's cross-validation (``training/worker/selection.py``) and by the label
stage's out-of-fold probabilities (``quality/label_issues.py``).
"""

from __future__ import annotations

import numpy as np


def fold_assignment(labels: np.ndarray, groups: np.ndarray, folds: int, *, seed: int) -> np.ndarray:
    """Fold number of every row: whole groups dealt round-robin per class, in a seeded order.

    A group takes the label of its first row (a source image's repeats all share it). Dealing each
    class's groups in turn keeps every fold's class mix within one group of the whole set's.
    """
    if folds < 2:
        raise ValueError(f"need at least 2 folds, not {folds}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    names, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    group_fold = np.empty(len(names), np.int64)
    rng = np.random.default_rng(seed)
    start = 0
    for label in np.unique(labels[first]):
        members = rng.permutation(np.flatnonzero(labels[first] == label))
        group_fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # the next class starts where this one stopped: folds stay even
    return group_fold[inverse.reshape(-1)]
