"""Test-only driver: `training.train` with test hooks installed through the loop's callbacks.

    python tests/train_with_hooks.py [--kill-during-checkpoint STEP] [--kill-at-event N] [--count-events FILE]
                                     [--debug-dir DIR] -- <training arguments>

`--kill-during-checkpoint STEP` kills the process (SIGKILL) while checkpoint STEP is being written, after its
files are on disk but before it is renamed into place: the worst moment for a non-atomic scheme.
`--kill-at-event N` kills the process (SIGKILL) just before its N-th file-system event or micro-batch, counting
every `os.rename` / `os.replace` / `os.unlink` / `os.remove` / `shutil.copyfile` call and every micro-batch: kills
land while a checkpoint is written or pruned, between the two renames that replace `last/`, while `metrics.csv` is
replaced, and mid-training. `--count-events FILE` writes the number of events of a complete run to FILE.
`--debug-dir DIR` makes every process log the dataset indices it trains on (`samples_rank<r>.jsonl`) and, at the
end, its own copy of the weights (`weights_rank<r>.safetensors`; gathered whole under FSDP) and the size of its
part of each parameter (`shards_rank<r>.json`: its shard's and the whole parameter's element counts). Runs under `accelerate
launch` too.
"""

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

from commands import run
from training.config import load_config
from training.fsdp import full_tensors, local_tensor
from training.train import TrainingCallback, train


class KillDuringCheckpoint(TrainingCallback):
    def __init__(self, step: int):
        self.step = step

    def before_checkpoint_commit(self, *, step, folder):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillAtEvent(TrainingCallback):
    """Counts file-system events (patched process-wide) and micro-batches; SIGKILL before event `kill_at`."""

    PATCHED = ((os, "rename"), (os, "replace"), (os, "unlink"), (os, "remove"), (shutil, "copyfile"))

    def __init__(self, kill_at: int | None):
        self.kill_at, self.count = kill_at, 0
        for module, name in self.PATCHED:
            setattr(module, name, self._counting(getattr(module, name)))

    def _event(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _counting(self, function):
        def counted(*args, **kwargs):
            self._event()
            return function(*args, **kwargs)

        return counted

    def on_micro_batch(self, *, rank, epoch, step, indices):
        self._event()


class DumpDebugState(TrainingCallback):
    def __init__(self, folder: Path):
        self.folder, self.log = folder, None

    def on_micro_batch(self, *, rank, epoch, step, indices):
        if self.log is None:
            self.log = open(self.folder / f"samples_rank{rank}.jsonl", "a")
        self.log.write(json.dumps({"epoch": epoch, "step": step, "indices": indices}) + "\n")

    def on_train_end(self, *, rank, model, ema):
        if self.log is not None:
            self.log.close()
        # What this process holds of each parameter (its shard under FSDP) and the parameter's full size.
        shards = {name: [local_tensor(p).numel(), p.numel()] for name, p in model.named_parameters()}
        (self.folder / f"shards_rank{rank}.json").write_text(json.dumps(shards))
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            weights.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
        # Under FSDP every process holds shards: gather the whole tensors (every process takes part).
        weights = dict(zip(weights, full_tensors(weights.values())))
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(weights, self.folder / f"weights_rank{rank}.safetensors")


def main(argv: list[str]) -> Path:
    if "--" not in argv:
        raise ValueError(
            "usage: train_with_hooks.py [--kill-during-checkpoint STEP] [--kill-at-event N] [--count-events FILE] "
            "[--debug-dir DIR] -- <training args>"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-during-checkpoint", type=int, default=None)
    parser.add_argument("--kill-at-event", type=int, default=None)
    parser.add_argument("--count-events", type=Path, default=None)
    parser.add_argument("--debug-dir", type=Path, default=None)
    hooks = parser.parse_args(argv[:split])
    callbacks = []
    events = None
    if hooks.kill_at_event is not None or hooks.count_events is not None:
        events = KillAtEvent(hooks.kill_at_event)
        callbacks.append(events)
    if hooks.kill_during_checkpoint is not None:
        callbacks.append(KillDuringCheckpoint(hooks.kill_during_checkpoint))
    if hooks.debug_dir is not None:
        callbacks.append(DumpDebugState(hooks.debug_dir))
    output_dir = train(load_config(argv[split + 1 :]), callbacks=callbacks)
    if hooks.count_events is not None:
        hooks.count_events.write_text(str(events.count))
    return output_dir


if __name__ == "__main__":
    run(main, sys.argv[1:])
