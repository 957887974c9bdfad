"""How much two masks overlap: the one Dice of the project.

It lives below every stage, so the engine (ensemble agreement), training (validation) and evaluation
(metrics) share it without one of them importing another.
"""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (nonzero = inside); two empty masks agree perfectly (1.0).

    The one Dice of the project: metrics, engine agreement, precision checks and training validation.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total
