"""``[federated]``: rounds, sampling, screening, simulated faults and attacks, uploads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fedalign.config.checks import at_least_one, in_unit_interval, one_of
from fedalign.errors import ConfigError

FAULT_KINDS = ("raise", "vanish", "hang")
"""Kinds of injected client faults (``federated.fault-kinds``)."""
ATTACKS = ("none", "scale", "sign-flip")
"""Simulated malicious-client updates (``federated.attack``)."""
UPLOAD_COMPRESSIONS = ("none", "bf16", "int8", "int4", "int3", "int2", "topk")
"""Values of ``federated.upload-compression`` (see :mod:`fedalign.compression`)."""


@dataclass
class FederatedConfig:
    """The federation.

    Parameters
    ----------
    rounds : int, default 25
    fraction : float, default 1.0
        Fraction of clients sampled each round (at least one).
    seed : int, default 0
        Seeds partitioning, initialisation, sampling, shuffling: same seed, same numbers.
    eval_every : int, default 1
        Evaluate the global model every this many rounds (and always after the last).
    min_local_test : int, default 20
        Clients with at least this many local test examples enter the per-client
        percentile (``local_accuracy_p10``); smaller splits say little about a client.
    min_clients : int, default 1
        A round is aggregated only when at least this many selected clients returned a
        result that passed validation; otherwise the run stops with an error (the last
        checkpoint stays resumable).
    clip_update_norm : float, default 0.0
        When > 0, each client's update (its parameters minus the global ones) is scaled
        down to at most this L2 norm (over all trainable tensors) before aggregation.
        0 turns clipping off.
    screen_norm_multiple : float, default 5.0
        When > 0, an update whose L2 norm exceeds this multiple of the round's median update
        norm (the lower median of the valid results' norms) is an outlier and is scaled down,
        its direction kept, to the norm of the client nearest to it in training examples
        (what an honest update of its size measures), so that a boosted update weighs like
        an honest one; ``clip_update_norm`` applies on top. 0 turns it off; otherwise at
        least 1. The default 5 left every honest update of the demo untouched (the largest
        was 3.5 times the median).
    fault_rate : float, default 0.0
        Simulator only: probability that a selected client fails in a round (fault
        injection for testing; 0 = no faults, the default behaviour bit for bit).
    fault_seed : int, default 0
        Seeds the fault draws (independent of ``seed``: faults never move other numbers).
    fault_kinds : list of str, default ["raise", "vanish", "hang"]
        What an injected fault does, drawn uniformly: ``raise`` (the client raises),
        ``vanish`` (no reply) or ``hang`` (no reply before the deadline, recorded as a
        timeout; nothing sleeps).
    attack : str, default "none"
        Simulator only: ``none``, ``scale`` (the attacking clients upload
        ``global + attack_scale * update``) or ``sign-flip`` (``global - update``), where
        ``update`` is the client's honest parameters minus the global ones.
    attack_clients : list of int, default []
        Ids of the attacking clients (each must be ``< partition.num-clients``).
    attack_scale : float, default 1000.0
        Factor of the ``scale`` attack.
    upload_compression : str, default "none"
        What a client uploads: ``none`` (its full float32 parameters, as always), or its
        delta (parameters minus the round's global ones) as ``bf16``, ``int8`` (one
        symmetric scale per row), ``int4`` / ``int3`` / ``int2`` (that many bits a value
        plus one bfloat16 scale per row: 0.13x / 0.10x / 0.07x of float32) or ``topk``
        (the ``topk_fraction`` largest magnitudes per tensor). The server restores float32
        parameters before screening, so every strategy works unchanged
        (:mod:`fedalign.compression`).
    topk_fraction : float, default 0.1
        Fraction of each tensor's values a ``topk`` upload keeps, in (0, 1].
    error_feedback : bool, default True
        With a lossy ``upload_compression``: each client keeps what compression dropped
        (a float32 residual per trainable tensor, kept between its rounds and
        checkpointed) and adds it to its next delta.
    """

    rounds: int = 25
    fraction: float = 1.0
    seed: int = 0
    eval_every: int = 1
    min_local_test: int = 20
    min_clients: int = 1
    clip_update_norm: float = 0.0
    screen_norm_multiple: float = 5.0
    fault_rate: float = 0.0
    fault_seed: int = 0
    fault_kinds: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    attack: str = "none"
    attack_clients: list[int] = field(default_factory=list)
    attack_scale: float = 1000.0
    upload_compression: str = "none"
    topk_fraction: float = 0.1
    error_feedback: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``federated.*`` key out of range
        (``attack_clients`` against ``partition.num-clients``: the experiment's check)."""
        at_least_one("federated.rounds", self.rounds)
        in_unit_interval("federated.fraction", self.fraction, "(0, 1]")
        at_least_one("federated.eval-every", self.eval_every)
        at_least_one("federated.min-clients", self.min_clients)
        if not self.clip_update_norm >= 0:
            raise ConfigError(
                f"federated.clip-update-norm must be >= 0 (0 = off; got {self.clip_update_norm})"
            )
        multiple = self.screen_norm_multiple
        if not (multiple == 0 or 1 <= multiple < math.inf):
            raise ConfigError(
                "federated.screen-norm-multiple must be 0 (off) or a finite number >= 1 "
                f"(a multiple of the round's median update norm; got {multiple})"
            )
        in_unit_interval("federated.fault-rate", self.fault_rate, "[0, 1]")
        if not self.fault_kinds:
            raise ConfigError(
                f"federated.fault-kinds must name at least one of {list(FAULT_KINDS)}"
            )
        for kind in self.fault_kinds:
            one_of("federated.fault-kinds", kind, FAULT_KINDS)
        self._validate_attack()
        one_of("federated.upload-compression", self.upload_compression, UPLOAD_COMPRESSIONS)
        in_unit_interval("federated.topk-fraction", self.topk_fraction, "(0, 1]")

    def _validate_attack(self) -> None:
        one_of("federated.attack", self.attack, ATTACKS)
        if self.attack != "none" and not self.attack_clients:
            raise ConfigError(
                f"federated.attack = {self.attack!r} needs federated.attack-clients (ids of "
                "the attacking clients; got [])"
            )
        if self.attack != "none" and self.upload_compression != "none":
            raise ConfigError(
                f"federated.attack = {self.attack!r} poisons full parameter uploads: it needs "
                f"federated.upload-compression = 'none' (got {self.upload_compression!r})"
            )
        if not math.isfinite(self.attack_scale):
            raise ConfigError(f"federated.attack-scale must be finite (got {self.attack_scale})")
