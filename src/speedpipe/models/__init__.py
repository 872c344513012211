"""Networks: DiT (official-checkpoint compatible)."""
from .dit import DiT, DiT_models

__all__ = ["DiT", "DiT_models"]
