"""Labeled image datasets for training and evaluation (shipped MNIST, Hub id or local folder) as tensors in [-1, 1]."""

import io
import warnings
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

# Package data: shipped inside the installed `image_data` package (wheel, `pip install .` or editable install).
SHIPPED_MNIST_DIR = Path(__file__).resolve().parent / "mnist"
SHIPPED_MNIST_FILES = ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet")
IMAGE_COLUMN_CANDIDATES = ("image", "img")
LABEL_COLUMN_CANDIDATES = ("label", "labels")
UNREADABLE_IMAGE_CHOICES = ("stop", "skip")
LABEL_CHOICES = ("auto", "use", "ignore")
# `class_labels` of an item of an unlabelled dataset.
UNLABELLED = -1


class SplitNotFoundError(ValueError):
    """The data set has no split of the asked name; the message lists those it has."""


def shipped_mnist_dir() -> Path:
    """The folder holding the MNIST parquet files shipped as package data in `image_data/mnist`."""
    missing = [name for name in SHIPPED_MNIST_FILES if not (SHIPPED_MNIST_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The shipped MNIST is incomplete: {missing} not found in {SHIPPED_MNIST_DIR}. The files are package data "
            "of `image_data`: reinstall the project (`pip install .` or its wheel ships them), or in a checkout rebuild "
            "them with `python data/build_mnist.py`; or pass `dataset_name` to load another dataset."
        )
    return SHIPPED_MNIST_DIR


def _looks_like_path(name: str) -> bool:
    # A Hub id is "name" or "namespace/name"; anything else can only be meant as a local path.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or Path(name).drive != ""


def _select_split(loaded, split: str, source: str) -> datasets.Dataset:
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split not in loaded:
        raise SplitNotFoundError(f"Split '{split}' is not in {source}: available splits are {sorted(loaded)}.")
    return loaded[split]


def load_hf_dataset(
    dataset_name: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load one split as a `datasets.Dataset`: the shipped MNIST (None), a local folder or a Hub dataset id.

    A local folder is either a dataset saved with `save_to_disk` (a saved single `Dataset` is returned whatever
    `split` is) or files `datasets.load_dataset` recognises: parquet/arrow/csv files, or an image folder whose
    subfolder names are the classes. Hub datasets honour `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`.
    """
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string such as 'train' or 'test', got {split!r}.")
    if dataset_name is None:
        local_dir = shipped_mnist_dir()
    elif not isinstance(dataset_name, (str, Path)) or not str(dataset_name):
        raise ValueError(f"dataset_name must be a Hub dataset id or a local folder, got {dataset_name!r}.")
    else:
        candidate = Path(dataset_name).expanduser()
        if candidate.is_dir():
            local_dir = candidate
        elif candidate.exists():
            raise ValueError(f"dataset_name '{dataset_name}' is a file; pass the folder that holds the dataset.")
        elif isinstance(dataset_name, Path) or _looks_like_path(dataset_name):
            raise ValueError(f"dataset_name '{dataset_name}' does not exist (no such local folder).")
        else:
            local_dir = None

    if local_dir is None:
        try:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as error:
            raise ValueError(
                f"dataset_name '{dataset_name}' is not a local folder, and loading it from the Hub failed: {error}"
            ) from error
        return _select_split(loaded, split, f"Hub dataset '{dataset_name}'")
    if (local_dir / "dataset_dict.json").is_file() or (local_dir / "state.json").is_file():
        return _select_split(datasets.load_from_disk(str(local_dir)), split, f"saved dataset {local_dir}")
    try:
        loaded = datasets.load_dataset(str(local_dir), dataset_config_name, cache_dir=cache_dir)
    except Exception as error:  # datasets wraps reader errors in its own types; name the folder and the files
        if not any(path.is_file() for path in local_dir.rglob("*")):
            raise ValueError(
                f"The dataset folder {local_dir} is empty: put one subfolder of images per class in it, or "
                "parquet / arrow / csv files."
            ) from None
        unreadable = _unreadable_table_files(local_dir)
        which = f" Unreadable files: {unreadable[:5]}." if unreadable else ""
        raise ValueError(f"The local dataset {local_dir} cannot be read: {_root_cause(error)}.{which}") from error
    return _select_split(loaded, split, f"local dataset {local_dir}")


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {str(error).rstrip('.')}"


def _unreadable_table_files(folder: Path) -> list[str]:
    """The parquet files under `folder` whose footer and schema cannot be read."""
    import pyarrow.parquet

    unreadable = []
    for path in sorted(folder.rglob("*.parquet")):
        try:
            pyarrow.parquet.ParquetFile(path).schema_arrow
        except Exception:  # any reader failure means the file is damaged
            unreadable.append(str(path))
    return unreadable


def _find_column(dataset: datasets.Dataset, column: str | None, candidates, feature_type, what: str) -> str:
    available = list(dataset.column_names)
    if column is not None:
        if column not in available:
            raise ValueError(f"{what} column '{column}' is not in the dataset: available columns are {available}.")
        return column
    for name in candidates:
        if name in available:
            return name
    typed = [name for name, feature in dataset.features.items() if isinstance(feature, feature_type)]
    if len(typed) == 1:
        return typed[0]
    raise ValueError(
        f"Found no {what} column (looked for {list(candidates)} or a single {feature_type.__name__} column): "
        f"available columns are {available}. Pass `{what}_column`."
    )


class ImageTransform:
    """PIL image -> float tensor [C, H, W] in [-1, 1]: channel conversion, optional resize, zero padding and flip."""

    def __init__(
        self,
        resolution: int | None = None,
        pad_to: int | None = None,
        channels: int = 1,
        random_flip: bool = False,
    ):
        for name, value in (("resolution", resolution), ("pad_to", pad_to)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        if resolution is not None and pad_to is not None and pad_to < resolution:
            raise ValueError(f"pad_to ({pad_to}) must be at least resolution ({resolution}).")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
        self.resolution = resolution
        self.pad_to = pad_to
        self.channels = channels
        self.random_flip = random_flip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.resolution is not None and image.size != (self.resolution, self.resolution):
            image = self._resize_center_crop(image)
        pixels = np.array(image, dtype=np.uint8)
        if self.pad_to is not None:
            pixels = self._pad(pixels)
        tensor = torch.from_numpy(pixels).to(torch.float32).div_(127.5).sub_(1.0)
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if self.random_flip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor.contiguous()

    def _resize_center_crop(self, image: Image.Image) -> Image.Image:
        # Shorter side to `resolution`, then a centred square crop, as diffusers' training examples do.
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_width, new_height = max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        left, top = (new_width - self.resolution) // 2, (new_height - self.resolution) // 2
        return image.crop((left, top, left + self.resolution, top + self.resolution))

    def _pad(self, pixels: np.ndarray) -> np.ndarray:
        height, width = pixels.shape[:2]
        if height > self.pad_to or width > self.pad_to:
            raise ValueError(f"pad_to ({self.pad_to}) is smaller than the image ({height}x{width}); set resolution.")
        top, left = (self.pad_to - height) // 2, (self.pad_to - width) // 2
        padding = [(top, self.pad_to - height - top), (left, self.pad_to - width - left)] + [(0, 0)] * (pixels.ndim - 2)
        # Pixel 0 becomes -1 after scaling: black, MNIST's background.
        return np.pad(pixels, padding, constant_values=0)


class LabeledImageDataset(torch.utils.data.Dataset):
    """A torch view of an image `datasets.Dataset`: items `{"pixel_values", "class_labels"}`.

    `labels`: "use" needs a label column; "ignore" drops it (unconditional training on labelled data); "auto"
    uses one if the data has one, else the dataset is unlabelled. Unlabelled: `num_classes` and `id2label` are
    None and every item's `class_labels` is -1 (collatable; the loop passes no labels to the model).
    """

    def __init__(
        self,
        hf_dataset: datasets.Dataset,
        transform: ImageTransform,
        image_column: str | None = None,
        label_column: str | None = None,
        labels: str = "auto",
    ):
        if labels not in LABEL_CHOICES:
            raise ValueError(f"labels must be one of {list(LABEL_CHOICES)}, got {labels!r}.")
        if labels == "ignore" and label_column is not None:
            raise ValueError(f"label_column {label_column!r} was given with labels='ignore'; drop one of the two.")
        self.image_column = _find_column(hf_dataset, image_column, IMAGE_COLUMN_CANDIDATES, datasets.Image, "image")
        self.label_column = None
        if labels == "use" or label_column is not None:
            self.label_column = _find_column(
                hf_dataset, label_column, LABEL_COLUMN_CANDIDATES, datasets.ClassLabel, "label"
            )
        elif labels == "auto":
            try:
                self.label_column = _find_column(
                    hf_dataset, None, LABEL_COLUMN_CANDIDATES, datasets.ClassLabel, "label"
                )
            except ValueError:
                self.label_column = None  # no label column: an unlabelled image set
        self.transform = transform
        self.num_classes, self.id2label = None, None
        self.columns = list(hf_dataset.column_names)  # all of them, for messages about what the data holds
        self.hf_dataset = hf_dataset.select_columns([c for c in (self.image_column, self.label_column) if c])
        self._check_image_column()
        if self.label_column is None:
            return
        hf_dataset = self.hf_dataset
        label_feature = hf_dataset.features[self.label_column]
        if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
            hf_dataset = hf_dataset.class_encode_column(self.label_column)
            label_feature = hf_dataset.features[self.label_column]
        if isinstance(label_feature, datasets.ClassLabel):
            names = list(label_feature.names)
        elif isinstance(label_feature, datasets.Value) and label_feature.dtype.startswith(("int", "uint")):
            values = hf_dataset.unique(self.label_column)
            if min(values) < 0:
                raise ValueError(f"Label column '{self.label_column}' holds negative labels: {min(values)}.")
            names = [str(index) for index in range(max(values) + 1)]
        else:
            raise ValueError(
                f"Label column '{self.label_column}' must hold ClassLabel, integer or string labels, "
                f"got {label_feature}."
            )
        self.hf_dataset = hf_dataset
        self.num_classes = len(names)
        self.id2label = dict(enumerate(names))

    def _check_image_column(self) -> None:
        if not isinstance(self.hf_dataset.features[self.image_column], datasets.Image):
            try:
                self.hf_dataset = self.hf_dataset.cast_column(self.image_column, datasets.Image())
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Column '{self.image_column}' ({self.hf_dataset.features[self.image_column]}) cannot be read "
                    f"as images: {error}"
                ) from error

    def unreadable_rows(self) -> list[tuple[int, str, str]]:
        """(row, file path or '', why) of every image that does not decode: found before training, not mid-epoch."""
        column = self.hf_dataset.with_format("arrow")
        bad = []
        for start in range(0, len(column), 4096):
            cells = column[start : start + 4096][self.image_column].to_pylist()
            for offset, cell in enumerate(cells):
                cell = cell or {}
                source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell.get("path")
                try:
                    if source is None:
                        raise ValueError("the row holds no image")
                    with Image.open(source) as image:
                        image.load()  # decodes every pixel: a truncated file fails here, not in an epoch
                except Exception as error:  # PIL raises many types for damaged files
                    bad.append((start + offset, cell.get("path") or "", f"{type(error).__name__}: {error}"))
        return bad

    def drop_rows(self, rows) -> None:
        rows = set(rows)
        self.hf_dataset = self.hf_dataset.select([index for index in range(len(self.hf_dataset)) if index not in rows])

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        row = self.hf_dataset[int(index)]
        label = int(row[self.label_column]) if self.label_column is not None else UNLABELLED
        return {"pixel_values": self.transform(row[self.image_column]), "class_labels": label}

    @property
    def image_shape(self) -> tuple:
        """(channels, height, width) of the tensors this dataset yields, read from its first item."""
        return tuple(self[0]["pixel_values"].shape)


def load_image_dataset(
    dataset_name: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    resolution: int | None = None,
    pad_to: int | None = None,
    channels: int = 1,
    random_flip: bool = False,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    unreadable_images: str = "stop",
    labels: str = "auto",
) -> LabeledImageDataset:
    """Labeled images as tensors in [-1, 1]; the shipped MNIST by default (`pad_to=32` gives 32x32 digits).

    `random_flip` mirrors images left-right with probability 1/2: leave it off for digits and text.
    Every image of another dataset is decoded once up front; one that does not decode is an error naming its row
    and file (`unreadable_images="stop"`) or is left out with a warning (`"skip"`).
    """
    if unreadable_images not in UNREADABLE_IMAGE_CHOICES:
        raise ValueError(
            f"unreadable_images must be one of {list(UNREADABLE_IMAGE_CHOICES)}, got {unreadable_images!r}."
        )
    transform = ImageTransform(resolution=resolution, pad_to=pad_to, channels=channels, random_flip=random_flip)
    hf_dataset = load_hf_dataset(dataset_name, split, dataset_config_name=dataset_config_name, cache_dir=cache_dir)
    dataset = LabeledImageDataset(
        hf_dataset, transform, image_column=image_column, label_column=label_column, labels=labels
    )
    if dataset_name is None:
        return dataset  # the shipped MNIST is checked against its sha256 when built
    bad = dataset.unreadable_rows()
    if bad:
        listed = "; ".join(f"row {row}" + (f" ({path})" if path else "") + f": {why}" for row, path, why in bad[:5])
        summary = f"{len(bad)} of {len(dataset)} images of {dataset_name!r} (split {split!r}) cannot be read: {listed}"
        if unreadable_images == "stop":
            raise ValueError(f"{summary}. Fix or remove them, or set data.unreadable_images: skip to leave them out.")
        warnings.warn(f"{summary}; left out (data.unreadable_images: skip).", UserWarning, stacklevel=2)
        dataset.drop_rows(row for row, _, _ in bad)
        if len(dataset) == 0:
            raise ValueError(f"No readable image is left in {dataset_name!r} (split {split!r}).")
    return dataset


def load_mnist_arrays(split: str = "test") -> tuple:
    """The shipped MNIST split as (uint8 images [N, 28, 28], int64 labels [N]) numpy arrays."""
    table = load_hf_dataset(None, split).with_format("arrow")[:]
    png_bytes = table.column("image").combine_chunks().field("bytes").to_pylist()
    images = np.empty((len(png_bytes), 28, 28), dtype=np.uint8)
    for index, data in enumerate(png_bytes):
        images[index] = np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]))
    labels = table.column("label").to_numpy().astype(np.int64)
    return images, labels
