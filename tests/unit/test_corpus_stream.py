"""Corpora read as streams: files, folders, JSONL, datasets, shuffling and the token budget."""

from __future__ import annotations

import json
import random
import sys
import types

import pytest

from loracast import corpus as corpus_module
from loracast.capture import record_pair
from loracast.corpus import CorpusStream, iter_documents, load_corpus, shuffle_buffered
from tests.conftest import TRAINING_TEXT


def _paragraphs(count: int, offset: int = 0) -> list[str]:
    # Each paragraph is over 200 characters, so split_passages makes it one passage.
    return [
        f"Paragraph {offset + i}. "
        + " ".join(TRAINING_TEXT[(offset + i + k) % 8] for k in range(4))
        for i in range(count)
    ]


@pytest.fixture()
def corpus_folder(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(_paragraphs(10)))
    (folder / "nested" / "b.md").write_text("\n\n".join(_paragraphs(10, 10)))
    records = [{"body": text} for text in _paragraphs(10, 20)]
    (folder / "c.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    (folder / "ignored.csv").write_text("not,read\n")
    return folder


def test_stream_repeats_its_order(corpus_folder):
    stream = CorpusStream(str(corpus_folder), text_field="body", seed=3)
    first = list(stream)
    assert first == list(stream)
    assert len(first) == 30


def test_stream_seed_changes_order_only(corpus_folder):
    first = list(CorpusStream(str(corpus_folder), text_field="body", seed=0))
    second = list(CorpusStream(str(corpus_folder), text_field="body", seed=1))
    assert first != second
    assert sorted(first) == sorted(second)
    assert sorted(first) == sorted(load_corpus(str(corpus_folder), text_field="body"))


def test_stream_stops_at_max_passages(corpus_folder):
    stream = CorpusStream(str(corpus_folder), text_field="body", max_passages=7)
    assert len(list(stream)) == 7


def test_stream_identity_has_absolute_path(corpus_folder, monkeypatch):
    monkeypatch.chdir(corpus_folder.parent)
    identity = CorpusStream("corpus", max_passages=5).identity()
    assert identity["spec"] == str(corpus_folder.resolve())
    assert identity["max_passages"] == 5


def test_jsonl_without_field_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
        list(CorpusStream(str(path)))


def test_missing_corpus_lists_accepted_forms(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf:NAME"):
        list(iter_documents(str(tmp_path / "missing.txt")))


def test_large_text_file_read_in_blocks(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    text = "\n\n".join(_paragraphs(12)) + "\n"
    path.write_text(text)
    monkeypatch.setattr(corpus_module, "_BLOCK_CHARS", 600)
    blocks = list(iter_documents(str(path)))
    assert len(blocks) > 2
    assert all(block.strip() for block in blocks)
    # Blocks end at blank lines, so they hold the same paragraphs as the whole file.
    rejoined = [p.strip() for block in blocks for p in block.split("\n\n") if p.strip()]
    assert rejoined == [p.strip() for p in text.split("\n\n") if p.strip()]


def test_shuffle_buffer_keeps_every_item():
    items = [str(i) for i in range(100)]
    shuffled = list(shuffle_buffered(items, 10, random.Random(0)))
    assert sorted(shuffled) == sorted(items)
    assert shuffled != items
    # No item comes out more than the buffer size before its stream position.
    assert all(shuffled.index(item) >= int(item) - 10 for item in items)


def test_saved_dataset_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs the datasets package (data extra)")
    texts = _paragraphs(6)
    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(tmp_path / "single"))
    stream = CorpusStream(str(tmp_path / "single"), text_field="content", shuffle_buffer=1)
    assert list(stream) == texts

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts[:3]}),
            "validation": datasets.Dataset.from_dict({"text": texts[3:]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    chosen = CorpusStream(str(tmp_path / "splits"), split="validation", shuffle_buffer=1)
    assert list(chosen) == texts[3:]
    with pytest.raises(ValueError, match="not 'test'.*--corpus-split"):
        list(CorpusStream(str(tmp_path / "splits"), split="test"))
    with pytest.raises(ValueError, match="no string field 'body'"):
        list(CorpusStream(str(tmp_path / "single"), text_field="body"))


def test_hub_dataset_is_streamed(monkeypatch):
    calls = []

    def load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": text} for text in _paragraphs(4)])

    fake = types.ModuleType("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    passages = list(CorpusStream("hf:someone/prose:clean", split="train", max_passages=3))
    assert calls == [("someone/prose", "clean", "train", True)]
    assert len(passages) == 3
    assert set(passages) <= set(_paragraphs(4))


def test_token_budget_stops_recording(tiny_source, tiny_target, tiny_corpus):
    name = "model.layers.0.self_attn.v_proj"
    full = record_pair(tiny_source, tiny_target, tiny_corpus, [name], [name], show_progress=False)
    limited = record_pair(
        tiny_source,
        tiny_target,
        tiny_corpus,
        [name],
        [name],
        max_source_tokens=200,
        show_progress=False,
    )
    # The passage that reaches the budget is read whole, and nothing after it.
    assert limited.stats["source_text_tokens"] >= 200
    assert limited.stats["source_text_tokens"] < 200 + 128
    assert limited.stats["texts"] < full.stats["texts"]
    rows = limited.num_positions
    assert limited.source[name]["input"].equal(full.source[name]["input"][:rows])
