"""Synthetic class-conditional latents: each class a fixed random pattern plus Gaussian noise.

Used by tests and benchmarks that need a latent dataset without running the data stages.
It has the same interface as the latent store (len, latent_shape, num_classes, get_batch).
"""
import torch


class SyntheticLatents:
    def __init__(self, num_examples: int, latent_shape, num_classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.latent_shape = tuple(latent_shape)
        self.num_classes = num_classes
        centers = torch.randn((num_classes, *self.latent_shape), generator=g)
        self.labels = torch.arange(num_examples) % num_classes
        self.latents = centers[self.labels] + 0.5 * torch.randn((num_examples, *self.latent_shape), generator=g)

    def __len__(self):
        return len(self.labels)

    def identity(self) -> str:
        return f"synthetic:{len(self.labels)}:{self.latent_shape}:{self.num_classes}"

    def get_batch(self, indices: torch.Tensor, flip: torch.Tensor, eps=None):
        x = self.latents[indices]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[indices]
