"""Train the MNIST feature network on the shipped train split and write its safetensors file.

Usage: `python -m evaluation.train_mnist_classifier [--output PATH] [--epochs 3] [--seed 0]`

Adam with a one-cycle learning rate, random shifts of up to 2 pixels (so features do not hinge on exact
centring), a fixed seed. The script prints the test accuracy and the file's sha256: paste that hash into
`MNIST_CLASSIFIER_SHA256` in `evaluation/mnist_classifier.py`, since metrics refuse any unpinned file.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from image_data import load_mnist_arrays

from .mnist_classifier import MNIST_CLASSIFIER_PATH, MNISTClassifier, save_mnist_classifier


def uint8_to_model_input(images) -> torch.Tensor:
    """uint8 [N, 28, 28] numpy digits -> float [N, 1, 28, 28] in [-1, 1], the range the denoisers train on."""
    return torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in x and y, filling with background (-1)."""
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offset_y = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    offset_x = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    rows = (offset_y[:, None] + torch.arange(height))[:, :, None]
    cols = (offset_x[:, None] + torch.arange(width))[:, None, :]
    return padded[torch.arange(batch)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` (switched to eval mode) on images in [-1, 1]."""
    model.eval()
    predictions = torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return predictions.eq(labels).float().mean().item()


def train(epochs: int, batch_size: int, learning_rate: float, max_shift: int, seed: int) -> tuple:
    """Train from scratch; return (model, test accuracy)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = load_mnist_arrays("train")
    test_images, test_labels = load_mnist_arrays("test")
    train_images, test_images = uint8_to_model_input(train_images), uint8_to_model_input(test_images)
    train_labels, test_labels = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    model = MNISTClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps_per_epoch = len(train_images) // batch_size
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch
    )
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator)
        progress = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}")
        for step in progress:
            batch = order[step * batch_size : (step + 1) * batch_size]
            logits = model(random_shift(train_images[batch], max_shift, generator))
            loss = F.cross_entropy(logits, train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss.item():.4f}")
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test_images, test_labels):.4f}", flush=True)
    return model, accuracy(model, test_images, test_labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(MNIST_CLASSIFIER_PATH), help="where to write the safetensors file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_shift", type=int, default=2, help="random translation in pixels (0 disables it)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_shift < 0:
        parser.error(f"--max_shift must be >= 0, got {args.max_shift}")

    start = time.perf_counter()
    model, test_accuracy = train(args.epochs, args.batch_size, args.learning_rate, args.max_shift, args.seed)
    seconds = time.perf_counter() - start
    metadata = {
        "test_accuracy": f"{test_accuracy:.4f}",
        "epochs": str(args.epochs),
        "batch_size": str(args.batch_size),
        "learning_rate": str(args.learning_rate),
        "max_shift": str(args.max_shift),
        "seed": str(args.seed),
        "torch_version": torch.__version__,
    }
    sha256 = save_mnist_classifier(model, args.output, metadata=metadata)
    print(f"test accuracy {test_accuracy:.4f} on the shipped MNIST test split (10,000 images)")
    print(f"trained in {seconds:.0f} s; wrote {args.output}")
    print(f'sha256 {sha256}\npin it: MNIST_CLASSIFIER_SHA256 = "{sha256}" in evaluation/mnist_classifier.py')


if __name__ == "__main__":
    from commands import run

    run(main)
