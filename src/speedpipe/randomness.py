"""Named random streams: one generator per (seed, stream), so each stream moves with its seed and with nothing else.

A run of seed s draws its initialisation ("init"), its timesteps, label dropout, flips, posterior samples and
diffusion noise (training), its proposal times and noise (distillation), and its labels and each sampling batch's
noise ("noise:{b}") each from a generator of its own. Drawing fewer numbers from one stream (SpeeD's dual timesteps, a
flip switched off) leaves every other stream's numbers as they were, so runs of one seed stay paired; streams that
shared one generator, or two seeds that coincide (s and s·1,000,003 + b at s = 0), would not.
"""
import hashlib

import torch


def stream_seed(seed: int, stream: str) -> int:
    """The seed of stream `stream` of a run of `seed`: 63 bits of SHA-256 of both."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little") >> 1


def random_stream(seed: int, stream: str, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, stream))
