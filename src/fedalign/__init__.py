"""fedalign: federated fine-tuning of Mixture-of-Experts models under non-IID data.

This file is the composition root: it registers every strategy of
:data:`fedalign.strategies.REGISTRY` with the configuration layer, so that a strategy's
options are config keys (TOML, ``--set``, CLI help, Flower run config) without the
configuration layer importing the strategies.
"""

from fedalign.config import register_strategy
from fedalign.strategies.registry import REGISTRY

__version__ = "0.1.0"

for _entry in REGISTRY.values():
    register_strategy(_entry.name, _entry.options, _entry.strategy.run_label)
