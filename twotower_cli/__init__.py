"""twotower: train, search, evaluate and report on two-tower retrieval models."""

__version__ = "0.1.0"
