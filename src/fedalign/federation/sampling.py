"""Which clients take part in a round."""

from __future__ import annotations

import numpy as np


def sample_clients(seed: int, server_round: int, num_clients: int, fraction: float) -> list[int]:
    """The clients of one round: ``max(1, round(fraction * N))`` of them, seeded per round."""
    count = max(1, round(fraction * num_clients))
    if count >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round, 7])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))
