"""Versioned, atomic folders of one JSON config and one safetensors file."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class FormatError(ValueError):
    """A saved loracast folder is missing, malformed, or of an unsupported format version."""


def provenance() -> dict:
    """Return versions, the command line and the time, recorded in every saved artifact."""
    import peft
    import transformers

    from loracast import __version__

    return {
        "loracast": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def make_staging_folder(folder: Path) -> Path:
    """Create an empty hidden sibling of ``folder`` to write into before renaming it into place.

    ``tempfile.mkdtemp`` creates mode 0700; the folder gets the usual umask-based mode instead,
    so the final output is readable like any other folder the user creates.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


_RENAME_EXCHANGE = 2  # from <linux/fs.h>
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one atomic step with Linux's renameat2; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    return result == 0


def replace_folder(staging: Path, folder: Path) -> None:
    """Move a fully written ``staging`` folder to ``folder``, retiring any previous ``folder``.

    On Linux the two folders are swapped in one atomic ``renameat2`` call, so ``folder`` is at
    every moment the complete old or the complete new output, and the old one is then deleted.
    Elsewhere (or on file systems without the exchange), the old folder is first renamed aside
    and the new one renamed in.

    NOTE: in that fallback, a crash between the two renames leaves no ``folder``; the old output
    then survives as ``.<name>.old-*/old`` beside it.
    """
    if not folder.exists():
        os.replace(staging, folder)
        return
    if _exchange(staging, folder):
        shutil.rmtree(staging, ignore_errors=True)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, retired / "old")
    os.replace(staging, folder)
    shutil.rmtree(retired, ignore_errors=True)


def write_folder(
    folder: str | Path,
    config_name: str,
    config: dict,
    weights_name: str,
    tensors: dict[str, torch.Tensor],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a config and tensors into ``folder`` atomically.

    Everything is written into a temporary sibling folder that is renamed into place at the end,
    so an interrupted write leaves either the previous folder or none.

    Raises:
        FileExistsError: ``folder`` exists and ``overwrite`` is False.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"output folder {folder} exists; choose another or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(folder)
    try:
        # Copies, because shared encoders would otherwise be tensors that share memory.
        contiguous = {key: value.detach().cpu().clone() for key, value in tensors.items()}
        save_file(contiguous, str(staging / weights_name))
        (staging / config_name).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_config(folder: str | Path, config_name: str, kind: str) -> dict:
    """Read and check the JSON config of a folder written by ``write_folder``.

    Raises:
        FileNotFoundError: the config file is missing.
        FormatError: the JSON is malformed, of another kind, or of a newer format version.
    """
    folder = Path(folder).expanduser()
    config_path = folder / config_name
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; is {folder} a loracast {kind} folder?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FormatError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise FormatError(f"{config_path}: expected a loracast {kind}, found kind {found!r}")
    version = config.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FormatError(f"{config_path}: format_version {version!r} is invalid")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{config_path}: format_version {version} is newer than this loracast supports "
            f"({FORMAT_VERSION}); upgrade loracast"
        )
    return config


def read_folder(
    folder: str | Path, config_name: str, weights_name: str, kind: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check a folder written by ``write_folder``.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        FormatError: the JSON is malformed, of another kind, or of a newer format version, or the
            weights file is corrupt.
    """
    config = read_config(folder, config_name, kind)
    weights_path = Path(folder).expanduser() / weights_name
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found; the {kind} folder is incomplete")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise FormatError(f"{weights_path} is corrupt or truncated ({error})") from error
    return config, tensors
