"""Atomic writes: a reader (or a resumed run) never sees a half-written file or folder.

Everything is written into a hidden temporary file or folder beside its destination, then renamed into place (a
rename is atomic on POSIX file systems). A folder replacement takes two renames; `recover_directory` undoes one
interrupted between them. Used for everything a user trained or measured: checkpoints, pipeline folders,
configs, reports and metric caches.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"
REPLACED_PREFIX = ".old-"
CACHE_ENV = "SCRATCH_DIFFUSION_CACHE"


def cache_dir() -> Path:
    """The project's cache (metric reference statistics, extracted text encoders): `$SCRATCH_DIFFUSION_CACHE`, else
    `$HF_HOME/scratch_diffusion` (`~/.cache/huggingface/scratch_diffusion`). Never inside the checkout."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "scratch_diffusion"


def replace_directory(temporary: Path, destination: Path) -> None:
    """Move a finished `temporary` folder to `destination`, replacing any previous one."""
    replaced = destination.with_name(REPLACED_PREFIX + destination.name)
    if replaced.exists():
        shutil.rmtree(replaced)
    if destination.exists():
        os.rename(destination, replaced)
    os.rename(temporary, destination)
    if replaced.exists():
        shutil.rmtree(replaced)


def recover_directory(destination: Path) -> None:
    """Undo a replacement interrupted between its two renames (the previous folder is still complete)."""
    replaced = destination.with_name(REPLACED_PREFIX + destination.name)
    if replaced.exists() and not destination.exists():
        try:
            os.rename(replaced, destination)
        except FileNotFoundError:
            pass  # another process of the same run recovered it first


def write_atomically(destination: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(folder)` on a temporary folder, then rename it to `destination`."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(TEMPORARY_PREFIX + destination.name)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    write(temporary)
    replace_directory(temporary, destination)
    return destination


def write_file_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` on a temporary file beside `path` (mode 0644), then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return write_file_atomically(path, lambda temporary: temporary.write_text(text))
