"""speedpipe: a reproducibility pipeline for SpeeD (faster DiT training) and sCM (consistency distillation)."""

__version__ = "0.1.0"
