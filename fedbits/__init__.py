"""fedbits: federated fine-tuning of language models over very little bandwidth."""

__version__ = "0.1.0"
