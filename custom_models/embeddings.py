"""Conditioning pieces shared by every denoiser: timestep, class-label, pooled-text and 2D position embeddings.

Every table here is computed in float32 inside `forward` and cast at use. diffusers' `from_pretrained`
builds models under `torch.set_default_dtype(torch_dtype)`, so a table computed once in `__init__`
would be built in fp16 (errors up to 0.4 were measured) and never re-cast.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------------------------------
# Input normalisation shared by all models
# --------------------------------------------------------------------------------------------------
def timesteps_to_batch(timestep: torch.Tensor | float | int, batch_size: int, device: torch.device) -> torch.Tensor:
    """Turn a Python number, a 0-d tensor or a `[batch]` tensor into a float32 `[batch]` tensor.

    Integer DDPM/DDIM timesteps (0..999) and float flow-matching timesteps (0..1000) share one scale,
    so a single embedding serves both.
    """
    if not torch.is_tensor(timestep):
        timestep = torch.tensor(timestep, device=device)
    timestep = timestep.to(device=device, dtype=torch.float32)
    if timestep.ndim == 0:
        return timestep.expand(batch_size)
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch_size):
        raise ValueError(
            f"`timestep` must be a number, a 0-d tensor or a 1-d tensor of length 1 or batch size "
            f"{batch_size}; got shape {tuple(timestep.shape)}."
        )
    return timestep.expand(batch_size)


def check_class_labels(
    class_labels: torch.Tensor | None, num_classes: int | None, batch_size: int
) -> torch.Tensor | None:
    """Validate class labels; index `num_classes` is the null label used for classifier-free guidance."""
    if not num_classes:
        if class_labels is not None:
            raise ValueError("This model is unconditional (`num_classes` is None) but `class_labels` were given.")
        return None
    if class_labels is None:
        raise ValueError(
            f"This model is class-conditional (num_classes={num_classes}): pass `class_labels` with values in "
            f"0..{num_classes - 1}, or {num_classes} for the null (unconditional) label."
        )
    if not torch.is_tensor(class_labels):
        class_labels = torch.tensor(class_labels)
    class_labels = class_labels.reshape(-1).long()
    if class_labels.shape[0] == 1 and batch_size > 1:
        class_labels = class_labels.expand(batch_size)
    if class_labels.shape[0] != batch_size:
        raise ValueError(f"Got {class_labels.shape[0]} class labels for a batch of {batch_size} samples.")
    bad = (class_labels < 0) | (class_labels > num_classes)
    if torch.compiler.is_compiling():
        # A compiled graph cannot branch on tensor values without a graph break: assert inside it instead.
        torch._assert_async(
            ~bad.any(), f"Class labels out of range: allowed are 0..{num_classes} ({num_classes} = null label)."
        )
    elif bool(bad.any()):
        raise ValueError(
            f"Class label(s) {sorted(set(class_labels[bad].tolist()))} out of range: allowed are 0..{num_classes - 1}, "
            f"and {num_classes} for the null label."
        )
    return class_labels


# --------------------------------------------------------------------------------------------------
# Timestep and label embeddings
# --------------------------------------------------------------------------------------------------
def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of `[batch]` timesteps, `[batch, dim]`, always float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = nn.functional.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedding(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP (the DDPM / DiT recipe)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.linear_1 = nn.Linear(frequency_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_embedding(timesteps, self.frequency_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(features)))


class LabelEmbedding(nn.Module):
    """Class-label table with one extra row, index `num_classes`, for the null label of CFG."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(class_labels)


# --------------------------------------------------------------------------------------------------
# 2D sin-cos position embedding (MAE / DiT)
# --------------------------------------------------------------------------------------------------
def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_position_embedding(dim: int, grid_height: int, grid_width: int, device=None) -> torch.Tensor:
    """Fixed `[grid_height * grid_width, dim]` position table, computed in float64, returned float32.

    Half the channels encode the row, half the column, so `dim` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}.")
    rows = torch.arange(grid_height, dtype=torch.float64, device=device)
    cols = torch.arange(grid_width, dtype=torch.float64, device=device)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    embedding = torch.cat([_sincos_1d(dim // 2, grid_rows), _sincos_1d(dim // 2, grid_cols)], dim=1)
    return embedding.float()


def check_pooled_projections(pooled_projections: torch.Tensor | None, batch_size: int, dim: int, model: str) -> None:
    """A pooled text embedding must be `[batch, pooled_projection_dim]`; the message says what was passed instead."""
    if pooled_projections is None or tuple(pooled_projections.shape) != (batch_size, dim):
        got = None if pooled_projections is None else tuple(pooled_projections.shape)
        raise ValueError(
            f"This {model} conditions on a pooled text embedding: pass `pooled_projections` of shape "
            f"[batch={batch_size}, pooled_projection_dim={dim}]; got {got}."
        )


class PooledProjection(nn.Module):
    """Two-layer MLP from a pooled text embedding to the conditioning width (SD3's adaLN input, SDXL's
    `add_embedding` of the UNet's time embedding)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(pooled)))
