"""Unit-test settings (one torch thread) and model folders on disk for command-line tests."""

import pytest
import torch

from tests.conftest import TRAINING_TEXT, build_tiny_gemma3, build_tiny_llama
from tests.unit.test_adapters import save_random_adapter


@pytest.fixture(autouse=True)
def _single_thread():
    # Thread start-up costs more than tiny matrix products gain, and on a shared 2-core
    # machine two threads per process oversubscribe the cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def model_folders(tmp_path, byte_tokenizer, metaspace_tokenizer):
    source = build_tiny_llama(len(byte_tokenizer))
    source.save_pretrained(tmp_path / "source")
    byte_tokenizer.save_pretrained(tmp_path / "source")
    target = build_tiny_gemma3(len(metaspace_tokenizer))
    target.save_pretrained(tmp_path / "target")
    metaspace_tokenizer.save_pretrained(tmp_path / "target")
    save_random_adapter(build_tiny_llama(len(byte_tokenizer)), tmp_path / "adapter")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(TRAINING_TEXT[:24]))
    return tmp_path
