"""Pictures of a pipeline's output: a grid with one row per label, and a GIF of the denoising trajectory.

The training loop's evaluation samples, `python -m commands.sample` and `python -m commands.evaluate` all make
their grids and GIFs here.
"""

import os

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import make_image_grid
from PIL import Image

GIF_FRAME_MS = 80
# The final, denoised grid stays on screen longer before the GIF loops.
GIF_FINAL_FRAME_MS = 1500


def image_grid(images: list[Image.Image] | torch.Tensor, cols: int) -> Image.Image:
    """PIL images (or `[N, C, H, W]` tensors in [0, 1]) as a grid of `cols` columns, one row per `cols` images."""
    if isinstance(images, torch.Tensor):
        # A diverged model's NaN pixels show as black rather than as undefined uint8 casts.
        images = torch.nan_to_num(images.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
        images = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    if cols < 1 or len(images) % cols:
        raise ValueError(f"{len(images)} images do not fill rows of {cols}; give a multiple of {cols}.")
    return make_image_grid(images, rows=len(images) // cols, cols=cols)


def save_trajectory_gif(
    trajectory: list[list[Image.Image]],
    cols: int,
    path: str | os.PathLike,
    frame_ms: int = GIF_FRAME_MS,
    max_frames: int | None = None,
) -> int:
    """Write the denoising trajectory (the images after every step) as a looping GIF of grids; returns its frame
    count. `max_frames` keeps that many evenly spaced steps, the last one included."""
    if frame_ms < 1:
        raise ValueError(f"frame_ms must be at least 1, got {frame_ms}.")
    picked = range(len(trajectory))
    if max_frames is not None and len(trajectory) > max_frames:
        picked = sorted(set(np.linspace(0, len(trajectory) - 1, max_frames).round().astype(int).tolist()))
    frames = [image_grid(trajectory[index], cols) for index in picked]
    durations = [frame_ms] * (len(frames) - 1) + [max(frame_ms, GIF_FINAL_FRAME_MS)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False)
    return len(frames)
