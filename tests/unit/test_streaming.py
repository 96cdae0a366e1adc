"""Streamed recording: shards equal the in-memory recording, and killed runs resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loracast
from loracast import streaming
from loracast.architectures import FAMILIES, Site
from loracast.bridge import BridgeConfig, record_corpus
from loracast.corpus import CorpusStream
from loracast.models import load_model
from loracast.shards import MANIFEST, Manifest, ShardReader, tensor_key
from loracast.streaming import ShardConfig, record_shards

SITES = [Site(1, "self_attn.q_proj"), Site(2, "self_attn.v_proj")]
CONFIG = BridgeConfig(max_tokens=32, batch_size=4, max_positions=None)
# About 10 rows of these four tiny modules, so every batch closes a shard.
SMALL_SHARDS = ShardConfig(shard_megabytes=0.01)


def _record(source, target, corpus, folder, config=CONFIG, shards=SMALL_SHARDS):
    return record_shards(source, target, corpus, SITES, folder, config, shards, show_progress=False)


def _shard_tensors(folder: Path) -> list[dict[str, torch.Tensor]]:
    manifest = Manifest.load(folder)
    return [
        load_file(str(folder / record["file"]))
        for _, record in sorted(manifest.shards.items())
        if record["file"]
    ]


def _assert_same_shards(first: Path, second: Path) -> None:
    first_shards, second_shards = _shard_tensors(first), _shard_tensors(second)
    assert len(first_shards) == len(second_shards)
    for one, other in zip(first_shards, second_shards, strict=True):
        assert one.keys() == other.keys()
        for key in one:
            assert torch.equal(one[key], other[key]), key
    first_manifest, second_manifest = Manifest.load(first), Manifest.load(second)
    assert first_manifest.shards == second_manifest.shards
    assert first_manifest.identity == second_manifest.identity


def test_shards_equal_in_memory_recording(tiny_source, tiny_target, tiny_corpus, tmp_path):
    manifest = _record(tiny_source, tiny_target, tiny_corpus, tmp_path / "record")
    recording = record_corpus(
        tiny_source, tiny_target, tiny_corpus, SITES, CONFIG, show_progress=False
    )

    assert manifest.complete
    assert len(manifest.shards) > 3
    reader = ShardReader(tmp_path / "record")
    for side in ("source", "target"):
        for name, entry in getattr(recording, side).items():
            for kind, expected in entry.items():
                key = tensor_key(side, name, kind)
                parts = [reader.load(index, [key])[key] for index in reader.indices]
                assert torch.equal(torch.cat(parts), expected), key
    text_ids = torch.cat([reader.text_ids(index) for index in reader.indices])
    assert torch.equal(text_ids, recording.text_ids)
    for key in ("texts", "positions", "source_text_tokens", "aligned_fraction_of_source_tokens"):
        assert manifest.stats[key] == recording.stats[key], key


def test_layer_output_anchors_recorded(
    tiny_source, tiny_target, tiny_corpus, tmp_path, monkeypatch
):
    # A target family outside the role table is carried to its decoder layers' outputs, and a
    # decoder layer has no weight to size the shard rows by.
    monkeypatch.delitem(FAMILIES, "gemma3_text")
    manifest = _record(tiny_source, tiny_target, tiny_corpus[:8], tmp_path / "record")
    # Source layers 1 and 2 of 4 both map to target layer 1 of 3.
    assert manifest.identity["anchor_modules"] == ["model.layers.1"]
    reader = ShardReader(tmp_path / "record")
    width = tiny_target.model.config.hidden_size
    for kind in ("input", "output"):
        key = tensor_key("target", "model.layers.1", kind)
        assert reader.load(reader.indices[0], [key])[key].shape[1] == width, kind


def test_memmap_rows_match_loaded_rows(tiny_source, tiny_target, tiny_corpus, tmp_path):
    for dtype in ("float32", "bfloat16", "float16"):
        folder = tmp_path / dtype
        shards = ShardConfig(shard_megabytes=0.01, storage_dtype=dtype)
        _record(tiny_source, tiny_target, tiny_corpus[:8], folder, shards=shards)
        reader = ShardReader(folder)
        key = tensor_key("target", "model.layers.1.self_attn.q_proj", "output")
        index = reader.indices[-1]
        stored = load_file(str(reader.path(index)))[key]
        assert stored.dtype == getattr(torch, dtype)
        rows = torch.tensor([3, 0, 2, 3])
        taken = reader.take(index, key, rows)
        assert taken.dtype == torch.float32
        assert torch.equal(taken, stored[rows].float())


def test_reduced_storage_rounds_float32_rows(tiny_source, tiny_target, tiny_corpus, tmp_path):
    corpus = tiny_corpus[:8]
    _record(tiny_source, tiny_target, corpus, tmp_path / "full")
    half = ShardConfig(shard_megabytes=0.01, storage_dtype="bfloat16")
    _record(tiny_source, tiny_target, corpus, tmp_path / "half", shards=half)
    for full, rounded in zip(
        _shard_tensors(tmp_path / "full"), _shard_tensors(tmp_path / "half"), strict=True
    ):
        key = tensor_key("source", "model.layers.1.self_attn.q_proj", "input")
        assert torch.equal(full[key].to(torch.bfloat16), rounded[key])
        assert torch.equal(full["text_ids"], rounded["text_ids"])


def test_interrupted_recording_resumes(
    tiny_source, tiny_target, tiny_corpus, tmp_path, monkeypatch
):
    folder = tmp_path / "record"
    publish = streaming._publish
    calls = []

    def publish_three_times(*args):
        # Shards are listed once their files are complete, one round after they are recorded.
        # The fourth call would list shard 2, whose file is then on disk but never listed, as
        # when a process dies right there.
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        publish(*args)

    monkeypatch.setattr(streaming, "_publish", publish_three_times)
    with pytest.raises(KeyboardInterrupt):
        _record(tiny_source, tiny_target, tiny_corpus, folder)
    manifest = Manifest.load(folder)
    assert not manifest.complete
    assert sorted(manifest.shards) == [0, 1]
    assert (folder / "shard-000002.safetensors").is_file()
    with pytest.raises(ValueError, match="not complete"):
        ShardReader(folder)

    monkeypatch.setattr(streaming, "_publish", publish)
    recorded = []
    record_shard = streaming._record_shard
    monkeypatch.setattr(
        streaming, "_record_shard", lambda *a: recorded.append(a[5]) or record_shard(*a)
    )
    _record(tiny_source, tiny_target, tiny_corpus, folder)
    assert recorded[0] == 2  # shards 0 and 1 are not recorded again

    _record(tiny_source, tiny_target, tiny_corpus, tmp_path / "uninterrupted")
    _assert_same_shards(folder, tmp_path / "uninterrupted")


_KILLED_RUN = """
import json, os, signal, sys
from pathlib import Path
from loracast import shards
from loracast.architectures import FAMILIES, Site
from loracast.bridge import BridgeConfig
from loracast.models import load_model
from loracast.streaming import ShardConfig, record_shards

folders, folder = Path(sys.argv[1]), Path(sys.argv[2])
write = shards.write_safetensors_atomic
written = []

def write_then_die(path, tensors, metadata=None):
    written.append(path)
    if len(written) == 3:
        # Die halfway through the third shard: a partial temporary file, no rename.
        (path.parent / f".{path.name}.0123456789ab.tmp").write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return write(path, tensors, metadata)

shards.write_safetensors_atomic = write_then_die
source = load_model(str(folders / "source"), device="cpu")
target = load_model(str(folders / "target"), device="cpu")
corpus = json.loads((folders / "passages.json").read_text())
sites = [Site(1, "self_attn.q_proj"), Site(2, "self_attn.v_proj")]
config = BridgeConfig(max_tokens=32, batch_size=4, max_positions=None)
record_shards(source, target, corpus, sites, folder, config, ShardConfig(shard_megabytes=0.01),
              show_progress=False)
"""


def test_killed_recording_resumes_to_same_shards(model_folders, tiny_corpus, tmp_path):
    (model_folders / "passages.json").write_text(json.dumps(tiny_corpus))
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    folder = tmp_path / "record"
    environment = dict(os.environ)
    package_root = str(Path(loracast.__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([package_root, environment.get("PYTHONPATH", "")])
    environment["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, str(script), str(model_folders), str(folder)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == -9, run.stderr
    # The kill comes from the writer thread, so the main thread may or may not have listed
    # shard 1 by then. Shard 2 is never listed.
    assert sorted(Manifest.load(folder).shards) in ([0], [0, 1])
    assert list(folder.glob(".*.tmp"))

    source = load_model(str(model_folders / "source"), device="cpu")
    target = load_model(str(model_folders / "target"), device="cpu")
    _record(source, target, tiny_corpus, folder)
    assert not list(folder.glob(".*.tmp"))
    _record(source, target, tiny_corpus, tmp_path / "uninterrupted")
    _assert_same_shards(folder, tmp_path / "uninterrupted")


def test_resume_rejects_other_settings(tiny_source, tiny_target, tiny_corpus, tmp_path):
    folder = tmp_path / "record"
    _record(tiny_source, tiny_target, tiny_corpus[:8], folder)
    other = BridgeConfig(max_tokens=16, batch_size=4, max_positions=None)
    with pytest.raises(ValueError, match=r"recording.max_tokens: recorded 32, this run 16"):
        _record(tiny_source, tiny_target, tiny_corpus[:8], folder, config=other)
    with pytest.raises(ValueError, match=r"corpus.sha256"):
        _record(tiny_source, tiny_target, tiny_corpus[:9], folder)
    with torch.no_grad():
        tiny_target.model.model.layers[0].mlp.up_proj.weight.mul_(2)
    with pytest.raises(ValueError, match=r"(?s)target.weights_fingerprint.*new --record-dir"):
        _record(tiny_source, tiny_target, tiny_corpus[:8], folder)


def test_changed_corpus_file_is_detected(tiny_source, tiny_target, tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    paragraphs = [
        f"Passage {i}: the quick brown fox jumps over the lazy dog. " * 5 for i in range(16)
    ]
    path.write_text("\n\n".join(paragraphs))
    stream = CorpusStream(str(path), shuffle_buffer=1)
    folder = tmp_path / "record"
    publish = streaming._publish
    calls = []

    def publish_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        publish(*args)

    monkeypatch.setattr(streaming, "_publish", publish_once)
    with pytest.raises(KeyboardInterrupt):
        _record(tiny_source, tiny_target, stream, folder)
    monkeypatch.setattr(streaming, "_publish", publish)

    path.write_text("\n\n".join(["Edited. " + paragraphs[0], *paragraphs[1:]]))
    with pytest.raises(ValueError, match="shard 0 .* was recorded from other text"):
        _record(tiny_source, tiny_target, stream, folder)


def test_foreign_folder_is_not_used(tiny_source, tiny_target, tiny_corpus, tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="contains files but no manifest.json"):
        _record(tiny_source, tiny_target, tiny_corpus[:4], folder)
    (folder / MANIFEST).write_text('{"kind": "cartridge"}')
    with pytest.raises(ValueError, match="not a loracast recording manifest"):
        _record(tiny_source, tiny_target, tiny_corpus[:4], folder)


def test_truncated_shard_is_rejected(tiny_source, tiny_target, tiny_corpus, tmp_path):
    folder = tmp_path / "record"
    _record(tiny_source, tiny_target, tiny_corpus[:8], folder)
    shard = folder / "shard-000000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="shard-000000.safetensors is missing or has another size"):
        ShardReader(folder)


def test_bfloat16_models_record_and_fit(tiny_source, tiny_target, tiny_corpus, tmp_path):
    from loracast.fit import HeadFitConfig
    from loracast.shard_fit import fit_bridge_from_shards

    for loaded in (tiny_source, tiny_target):
        loaded.model.to(torch.bfloat16)
    folder = tmp_path / "record"
    manifest = _record(tiny_source, tiny_target, tiny_corpus[:12], folder)
    assert manifest.identity["source"]["dtype"] == "bfloat16"
    stored = _shard_tensors(folder)[0]
    key = tensor_key("source", "model.layers.1.self_attn.q_proj", "output")
    assert stored[key].dtype == torch.float32  # the default storage dtype
    # bfloat16 activations are stored exactly: rounding them again changes nothing.
    assert torch.equal(stored[key].to(torch.bfloat16).float(), stored[key])

    config = BridgeConfig(max_tokens=32, batch_size=4, max_positions=None)
    config.head = HeadFitConfig(mlp_hidden=4, mlp_steps=5)
    bridge = fit_bridge_from_shards(
        tiny_source, tiny_target, folder, SITES, config, show_progress=False
    )
    for heads in bridge.sites.values():
        assert heads.encoder.linear.weight.dtype == torch.float32
        assert torch.isfinite(heads.decoder.linear.weight).all()
        assert heads.metrics["encoder_r2"] > 0
