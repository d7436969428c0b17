"""fedalign: federated fine-tuning of Mixture-of-Experts models under non-IID data."""

__version__ = "0.1.0"
