"""Train a small diffusers `AutoencoderKL` on MNIST for latent diffusion (`configs/mnist_ldm.yaml`).

    python -m training.train_vae --output_dir outputs/mnist_vae [--train.max_steps 2000 ...]

The loss is reconstruction (MSE) plus a small KL term, as in latent diffusion's KL-regularised autoencoders
(Rombach et al. 2022, without their perceptual and adversarial terms). After training, the latent scaling
factor 1 / std(latents) is measured on training images and stored in the VAE's config (`scaling_factor`),
so that the diffusion model sees latents of unit variance and the pipeline decodes with the right factor.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from atomic_files import write_atomically
from image_data import load_image_dataset

from .config import ConfigError, DataConfig, bounded, load_config, save_config


@dataclass
class VAEModelConfig:
    """The autoencoder: one encoder/decoder block per entry of `block_out_channels` (each but the last halves the size)."""

    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = bounded(1, 1)
    latent_channels: int = bounded(4, 1)
    norm_num_groups: int = bounded(16, 1)


@dataclass
class VAETrainingConfig:
    """Optimisation of the autoencoder."""

    batch_size: int = bounded(128, 1)
    learning_rate: float = bounded(1e-3, 0.0)
    num_epochs: int = bounded(2, 1)
    max_steps: int | None = bounded(None, 1)
    kl_weight: float = bounded(1e-6, 0.0)
    seed: int = bounded(0, 0, 2**32 - 1)
    # Training images whose latents measure the scaling factor.
    scaling_samples: int = bounded(2048, 2)


@dataclass
class VAEConfig:
    """A VAE training run."""

    output_dir: str = "outputs/mnist_vae"
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(pad_to=32))
    train: VAETrainingConfig = field(default_factory=VAETrainingConfig)


def build_vae(model_config: VAEModelConfig, channels: int, image_size: int) -> AutoencoderKL:
    """A diffusers `AutoencoderKL` with plain encoder/decoder blocks."""
    num_blocks = len(model_config.block_out_channels)
    if num_blocks < 1 or any(
        not isinstance(c, int) or c % model_config.norm_num_groups for c in model_config.block_out_channels
    ):
        raise ConfigError(
            f"model.block_out_channels must be a non-empty list of ints divisible by model.norm_num_groups "
            f"({model_config.norm_num_groups}), got {model_config.block_out_channels}."
        )
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=tuple(model_config.block_out_channels),
        layers_per_block=model_config.layers_per_block,
        latent_channels=model_config.latent_channels,
        norm_num_groups=model_config.norm_num_groups,
        sample_size=image_size,
    )


class VAELoss(torch.nn.Module):
    """The training loss as a module's forward, so that DDP sees (and synchronises) encoder and decoder together."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixel_values: torch.Tensor):
        """(total, reconstruction MSE, KL per image) for one batch."""
        posterior = self.vae.encode(pixel_values).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction.float(), pixel_values.float())
        kl = posterior.kl().mean()
        return mse + self.kl_weight * kl, mse, kl


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator, batch_size: int
) -> float:
    """1 / std of posterior samples over `images`: the factor giving the diffusion model unit-variance latents."""
    latents = [
        vae.encode(images[i : i + batch_size]).latent_dist.sample(generator=generator).float()
        for i in range(0, len(images), batch_size)
    ]
    return 1.0 / torch.cat(latents).std().item()


def train_vae(config: VAEConfig) -> Path:
    """Train, measure the scaling factor, save `AutoencoderKL` (+ `vae_metrics.json`); returns the output folder."""
    accelerator = Accelerator()
    set_seed(config.train.seed)
    dataset = load_image_dataset(
        split=config.data.train_split, label_column=config.data.label_column, **config.data.image_loading_kwargs()
    )
    if config.data.max_train_samples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(config.data.max_train_samples, len(dataset))))
    channels, image_size, _ = dataset[0]["pixel_values"].shape
    vae = build_vae(config.model, channels, image_size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.train.learning_rate)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(config.train.seed),
    )
    if len(loader) == 0:
        raise ConfigError(f"train.batch_size {config.train.batch_size} exceeds the {len(dataset)} training images.")
    loss_module, optimizer, loader = accelerator.prepare(VAELoss(vae, config.train.kl_weight), optimizer, loader)
    total_steps = config.train.num_epochs * len(loader)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    step, progress = 0, tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="vae steps")
    loss_module.train()
    while step < total_steps:
        for batch in loader:
            loss, mse, kl = loss_module(batch["pixel_values"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.1f}")
            if step >= total_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(loss_module).vae.eval()
        generator = torch.Generator().manual_seed(config.train.seed)
        num_images = min(config.train.scaling_samples, len(dataset))
        images = torch.stack([dataset[i]["pixel_values"] for i in range(num_images)]).to(accelerator.device)
        scaling_factor = measure_scaling_factor(vae, images, generator, config.train.batch_size)
        vae.register_to_config(scaling_factor=scaling_factor)
        with torch.no_grad():
            reconstruction = vae(images[: config.train.batch_size], sample_posterior=False).sample
            reconstruction_mse = F.mse_loss(reconstruction, images[: config.train.batch_size]).item()
        metrics = {"scaling_factor": scaling_factor, "reconstruction_mse": reconstruction_mse, "steps": step}

        def write(folder: Path) -> None:
            vae.save_pretrained(folder)
            (folder / "vae_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            save_config(config, folder / "training_config.yaml")

        write_atomically(output_dir, write)
        accelerator.print(
            f"Saved {output_dir}: scaling factor {scaling_factor:.4f}, reconstruction MSE {reconstruction_mse:.4f}."
        )
    accelerator.wait_for_everyone()
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    """Parse `[--config file.yaml] --section.key value ...` and train the VAE."""
    return train_vae(load_config(sys.argv[1:] if argv is None else argv, cls=VAEConfig))


if __name__ == "__main__":
    from commands import run

    run(main)
