"""Bad input and failures: each error names the problem and the fix, and loses nothing."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracast import serialization
from loracast.adapters import load_adapter
from loracast.bridge import BridgeConfig, fit_bridge, fit_bridge_from_recording, record_corpus
from loracast.cartridge import CARTRIDGE_CONFIG, Cartridge
from loracast.fit import HeadFitConfig, fit_head
from loracast.models import load_model
from loracast.serialization import FormatError
from tests.unit.test_adapters import save_random_adapter
from tests.unit.test_cartridge import _make_cartridge
from tests.unit.test_cli import _transfer_args


def _order(site):
    return (site.layer, site.module)


SITES_CONFIG = BridgeConfig(max_positions=300, head=HeadFitConfig(mlp_hidden=0))


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))


def test_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unreachable_hub_id_says_what_to_pass(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub to load the files.")

    monkeypatch.setattr("loracast.models.AutoTokenizer.from_pretrained", offline)
    expected = "could not load model .someone/model.*local model folder"
    with pytest.raises(ValueError, match=expected) as error:
        load_model("someone/model")
    assert "couldn't connect" in str(error.value)


def test_model_with_its_own_code_needs_the_flag(monkeypatch):
    def custom(*args, **kwargs):
        assert kwargs["trust_remote_code"] is False
        raise ValueError("... contains custom code ... pass the argument `trust_remote_code=True`")

    monkeypatch.setattr("loracast.models.AutoTokenizer.from_pretrained", custom)
    with pytest.raises(ValueError, match="--trust-remote-code"):
        load_model("someone/custom-model")


def test_gguf_of_an_unsupported_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="rwkv6.*convert this model"):
        load_model(str(path))


def test_non_finite_activations_name_the_module(tiny_source, tiny_target, tiny_corpus, tmp_path):
    peft_model = save_random_adapter(tiny_source.model, tmp_path / "adapter")
    tiny_source.model = peft_model.unload()
    sites = sorted(load_adapter(tmp_path / "adapter").kernels, key=_order)[:2]
    recording = record_corpus(
        tiny_source, tiny_target, tiny_corpus, sites, SITES_CONFIG, show_progress=False
    )
    recording.source[sites[1].name]["output"][5, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{sites[1].name} has NaN or inf in 1 of"):
        fit_bridge_from_recording(tiny_source, tiny_target, recording, sites, SITES_CONFIG)


def test_corpus_of_one_passage_is_too_small(tiny_source, tiny_target, tiny_corpus, tmp_path):
    peft_model = save_random_adapter(tiny_source.model, tmp_path / "adapter")
    tiny_source.model = peft_model.unload()
    sites = sorted(load_adapter(tmp_path / "adapter").kernels, key=_order)[:1]
    with pytest.raises(ValueError, match="yielded 1 usable passages; at least 2 are needed"):
        fit_bridge(tiny_source, tiny_target, tiny_corpus[:1], sites, SITES_CONFIG)


def test_full_disk_leaves_the_previous_cartridge(
    tiny_source, tiny_target, tiny_corpus, tmp_path, monkeypatch
):
    cartridge = _make_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path)
    folder = tmp_path / "cartridge"
    cartridge.save(folder)
    before = sorted(path.name for path in tmp_path.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serialization, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cartridge.save(folder, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        cartridge.save(tmp_path / "new-cartridge")
    # No staging folder is left behind, the new folder does not exist, the old one still loads.
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    Cartridge.load(folder, target=tiny_target)


@pytest.fixture()
def saved_cartridge(tiny_source, tiny_target, tiny_corpus, tmp_path):
    cartridge = _make_cartridge(
        tiny_source, tiny_target, tiny_corpus, tmp_path, modules=("q_proj",)
    )
    cartridge.save(tmp_path / "cartridge")
    return tmp_path / "cartridge"


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.lists(
        st.sampled_from(
            [
                "sites",
                0,
                "encoder",
                "d_in",
                "kernels",
                "site",
                "source",
                "scale",
                "layer_map",
                "adapter",
                "fingerprint",
                "anchor",
            ]
        ),
        min_size=1,
        max_size=3,
    ),
    value=_json,
)
def test_edited_cartridge_config_fails_only_with_format_error(
    saved_cartridge, tmp_path, path, value
):
    """Replace one value deep in a valid config; loading either works or raises FormatError."""
    folder = tmp_path / "edited"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved_cartridge, folder)
    config = json.loads((folder / CARTRIDGE_CONFIG).read_text())
    node = config
    for key in path[:-1]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and node:
            node = node[key]
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and node:
        node[last] = value
    (folder / CARTRIDGE_CONFIG).write_text(json.dumps(config))
    try:
        Cartridge.load(folder)
    except FormatError:
        pass


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=60) | _json.map(json.dumps))
def test_malformed_cartridge_json_fails_with_format_error(saved_cartridge, tmp_path, text):
    folder = tmp_path / "malformed"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(saved_cartridge, folder)
    (folder / CARTRIDGE_CONFIG).write_text(text)
    with pytest.raises(FormatError):
        Cartridge.load(folder)


def test_replace_folder_swaps_in_one_step_on_linux(tmp_path):
    old, new = tmp_path / "out", tmp_path / "staging"
    old.mkdir()
    (old / "config.json").write_text("old")
    new.mkdir()
    (new / "config.json").write_text("new")
    if sys.platform.startswith("linux"):
        assert serialization._exchange(new, old)
        assert (old / "config.json").read_text() == "new"
        assert serialization._exchange(new, old)  # and back
    serialization.replace_folder(new, old)
    assert (old / "config.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_killed_transfer_leaves_a_cartridge_that_loads(model_folders):
    """Kill ``loracast transfer --overwrite`` at several moments; the output always loads."""
    out = model_folders / "cartridge"
    command = [sys.executable, "-m", "loracast.cli", *_transfer_args(model_folders, out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=environment, capture_output=True)
    duration = time.perf_counter() - started
    first = json.loads((out / CARTRIDGE_CONFIG).read_text())["provenance"]["created"]

    outcomes = set()
    for fraction in (0.5, 0.8, 0.9, 0.95, 0.99):
        process = subprocess.Popen(
            [*command, "--overwrite"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        cartridge = Cartridge.load(out)
        assert len(cartridge.kernels) == 8
        created = json.loads((out / CARTRIDGE_CONFIG).read_text())["provenance"]["created"]
        outcomes.add("old" if created == first else "new")
        assert sorted(path.name for path in out.iterdir()) == [
            "cartridge.json",
            "cartridge.safetensors",
        ]
    assert "old" in outcomes


def test_diverging_mlp_head_keeps_its_last_good_state(caplog):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=generator)
    y = x @ torch.randn(6, 4, generator=generator) + 0.1 * torch.randn(200, 4, generator=generator)
    config = HeadFitConfig(mlp_hidden=8, mlp_steps=50, mlp_lr=1e30)
    with caplog.at_level(logging.WARNING, logger="loracast.fit"):
        head, metrics = fit_head(x[:150], y[:150], x[150:], y[150:], config, name="layer 3 encoder")
    assert "layer 3 encoder: residual MLP loss became" in caplog.text
    assert all(torch.isfinite(parameter).all() for parameter in head.parameters())
    assert metrics["r2"] >= metrics["r2_linear"]


def test_slow_tokenizer_cannot_be_aligned(tmp_path):
    import transformers

    from loracast.align import encode

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat"]) + "\n")
    # transformers 5 keeps the pure-Python tokenizers under *Legacy names; 4.x under plain ones.
    slow_class = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    slow = slow_class(str(vocab))
    assert not slow.is_fast
    with pytest.raises(ValueError, match="has no offset mapping.*use_fast=True"):
        encode(slow, "the cat sat")
