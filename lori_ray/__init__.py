"""lori-ray: Ray-distributed low-rank trajectory distillation of chain-of-thought teachers."""

__version__ = "0.1.0"
