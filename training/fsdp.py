"""FSDP through accelerate: `accelerate launch --use_fsdp --fsdp_version 2 ...` (or `accelerate config`).

The sharding is torch's FSDP2 (`fully_shard`), applied by accelerate's `prepare`; this module only does what the
loop needs around it:

- `fsdp_plugin` reads accelerate's FSDP settings from the environment and checks them: FSDP2 only (the loop's
  EMA and gathering work on FSDP2's per-parameter `DTensor` shards), and full state dicts in checkpoints (a
  sharded checkpoint is a torch.distributed.checkpoint folder whose metadata is read with `pickle.load`, which
  runs code, so it would break the rule that a checkpoint is untrusted input).
- `route_cpu_processes_to_fsdp`: accelerate turns several CPU processes into plain DDP (`MULTI_CPU`) and drops
  the FSDP request without a word; torch's FSDP2 runs on CPU with gloo, so this routes such a launch to
  accelerate's own FSDP path (tested with two gloo processes in CI).
- `full_tensors` / `load_full_tensors`: the main process evaluates and saves plain, unsharded copies; every
  process takes part in gathering them (a collective), and a resumed EMA is scattered back into shards.
"""

import os

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType

from .config_schema import ConfigError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # torch without torch.distributed: nothing can be sharded
    DTensor, distribute_tensor = None, None


class FSDPConfigError(ConfigError):
    """FSDP settings this loop cannot train with; the message says which and what to use."""


def fsdp_requested() -> bool:
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) launched this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def deepspeed_requested() -> bool:
    """`accelerate launch --use_deepspeed` (or a DeepSpeed accelerate config): refused by `build_accelerator`."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def fsdp_plugin(mixed_precision: str):
    """accelerate's `FullyShardedDataParallelPlugin` from the launch settings, checked for this loop."""
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise FSDPConfigError(
            f"FSDP version {version} was requested; this training loop supports FSDP2 only (per-parameter shards "
            "that its EMA and checkpoints work with): launch with `--fsdp_version 2` (or `fsdp_version: 2` in the "
            "accelerate config)."
        )
    state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT").upper()
    if state_dict_type != "FULL_STATE_DICT":
        raise FSDPConfigError(
            f"fsdp_state_dict_type {state_dict_type} was requested; checkpoints of this loop are untrusted input "
            "that must not run code when loaded, and a sharded (torch.distributed.checkpoint) folder's metadata is "
            "unpickled on load. Use `--fsdp_state_dict_type FULL_STATE_DICT` (the default here): the main process "
            "writes the full weights and optimizer state, read back with `weights_only` loading."
        )
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=StateDictType.FULL_STATE_DICT)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    return plugin


def route_cpu_processes_to_fsdp() -> None:
    """Before the `Accelerator` is built: make accelerate's distributed state FSDP for CPU processes (gloo), which
    it would otherwise run as DDP, silently ignoring the FSDP request."""
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise FSDPConfigError(
            f"FSDP on CPU needs several processes (`accelerate launch --use_fsdp --num_processes 2 ...`); this "
            f"launch runs as {state.distributed_type.value} with {state.num_processes} process(es)."
        )
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (the tensor itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


@torch.no_grad()
def full_tensors(tensors) -> list[torch.Tensor]:
    """The full value of every tensor, on every process: sharded ones are all-gathered (a collective: every process
    calls this with the same tensors in the same order), others are returned as they are."""
    return [tensor.full_tensor() if is_sharded(tensor) else tensor for tensor in tensors]


@torch.no_grad()
def load_full_tensors(destinations, sources) -> None:
    """Copy full tensors into `destinations`, sharding each like its destination (a collective when sharded)."""
    for destination, source in zip(destinations, sources, strict=True):
        if is_sharded(destination):
            source = distribute_tensor(
                source.to(destination.device, destination.dtype), destination.device_mesh, destination.placements
            )
        destination.copy_(source)
