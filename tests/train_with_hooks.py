"""Test-only driver: `training.train` with test hooks installed through the loop's callbacks.

    python tests/train_with_hooks.py [--kill-during-checkpoint STEP] [--debug-dir DIR] -- <training arguments>

`--kill-during-checkpoint STEP` kills the process (SIGKILL) while checkpoint STEP is being written, after its
files are on disk but before it is renamed into place: the worst moment for a non-atomic scheme.
`--debug-dir DIR` makes every process log the dataset indices it trains on (`samples_rank<r>.jsonl`) and, at the
end, its own copy of the weights (`weights_rank<r>.safetensors`). Runs under `accelerate launch` too.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from safetensors.torch import save_file

from commands import run
from training.config import load_config
from training.train import TrainingCallback, train


class KillDuringCheckpoint(TrainingCallback):
    def __init__(self, step: int):
        self.step = step

    def before_checkpoint_commit(self, *, step, folder):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


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
        weights = {f"model.{k}": v for k, v in model.state_dict().items()}
        if ema is not None:
            weights.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
        weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(weights, self.folder / f"weights_rank{rank}.safetensors")


def main(argv: list[str]) -> Path:
    if "--" not in argv:
        raise ValueError(
            "usage: train_with_hooks.py [--kill-during-checkpoint STEP] [--debug-dir DIR] -- <training args>"
        )
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-during-checkpoint", type=int, default=None)
    parser.add_argument("--debug-dir", type=Path, default=None)
    hooks = parser.parse_args(argv[:split])
    callbacks = []
    if hooks.kill_during_checkpoint is not None:
        callbacks.append(KillDuringCheckpoint(hooks.kill_during_checkpoint))
    if hooks.debug_dir is not None:
        callbacks.append(DumpDebugState(hooks.debug_dir))
    return train(load_config(argv[split + 1 :]), callbacks=callbacks)


if __name__ == "__main__":
    run(main, sys.argv[1:])
