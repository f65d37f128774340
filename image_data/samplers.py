"""Batch samplers for data-parallel training: every process its share of one seeded permutation per epoch."""

import torch


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches for one process: each epoch is one permutation drawn from (seed, epoch), shared by all processes.

    Consecutive blocks of `num_processes * batch_size` indices form one global micro-batch; process `rank` takes
    every `num_processes`-th index of it, so the processes together visit every kept index exactly once per
    epoch. The epoch is cut to whole optimizer steps (`gradient_accumulation_steps` micro-batches), and
    `set_epoch(epoch, skip_batches)` starts mid-epoch for exact resumption, without loading the skipped images.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        num_processes: int = 1,
        gradient_accumulation_steps: int = 1,
    ):
        per_step = num_processes * batch_size * gradient_accumulation_steps
        if num_samples < per_step:
            raise ValueError(
                f"The training set has {num_samples} images, fewer than one optimizer step needs: batch_size "
                f"{batch_size} x {num_processes} processes x {gradient_accumulation_steps} accumulation steps = {per_step}."
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.steps_per_epoch = num_samples // per_step
        self.batches_per_epoch = self.steps_per_epoch * gradient_accumulation_steps
        self.set_epoch(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        kept = permutation[: self.batches_per_epoch * self.num_processes * self.batch_size]
        mine = kept.view(-1, self.num_processes)[:, self.rank]
        return mine.view(self.batches_per_epoch, self.batch_size).tolist()

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches
        self.batches = self.epoch_batches(epoch)

    def __iter__(self):
        return iter(self.batches[self.skip_batches :])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip_batches
