"""Deterministic, resumable data order: a fresh permutation per (seed, epoch), consumed in global batches.

The position (epoch, batch index) is all the state there is, so a checkpoint stores two integers and a
resumed run draws exactly the batches an uninterrupted run would have. Under DDP every rank computes the
same global batch and takes its own contiguous slice, so the global batch does not depend on the world size.
"""
import torch

from speedpipe.errors import ConfigError


class EpochBatches:
    def __init__(self, num_examples: int, global_batch_size: int, seed: int, epoch: int = 0, position: int = 0,
                 key: str = "the global batch size"):
        """key: the config key of the batch size, named when the dataset is smaller than one batch."""
        if num_examples < global_batch_size:
            raise ConfigError(f"config key '{key}': a batch of {global_batch_size} is larger than the {num_examples} "
                              f"examples it is drawn from; lower it to at most {num_examples}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = epoch
        self.position = position  # index of the next batch within the epoch
        self.batches_per_epoch = num_examples // global_batch_size  # the ragged tail of each epoch is dropped
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=g)

    def next_global_batch(self) -> torch.Tensor:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.position * self.global_batch_size
        self.position += 1
        return self._perm[start : start + self.global_batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation(self.epoch)


def rank_slice(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch (or of any per-example tensor drawn for it)."""
    if global_batch.shape[0] % world_size:
        raise ValueError(f"global batch of {global_batch.shape[0]} does not split over {world_size} ranks")
    per_rank = global_batch.shape[0] // world_size
    return global_batch[rank * per_rank : (rank + 1) * per_rank]
