"""Data-parallel runs: two processes under accelerate launch give one process's bridge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loracast
from loracast.cli import main
from loracast.distributed import ProcessContext, process_context
from loracast.shards import Manifest
from tests.conftest import TRAINING_TEXT


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _transfer_args(folder: Path, out: str, record_dir: str) -> list[str]:
    return [
        "-q",
        "transfer",
        "--source",
        str(folder / "source"),
        "--target",
        str(folder / "target"),
        "--adapter",
        str(folder / "adapter"),
        "--corpus",
        str(folder / "long.txt"),
        "--out",
        str(folder / out),
        "--record-dir",
        str(folder / record_dir),
        "--shard-megabytes",
        "0.05",
        "--mlp-hidden",
        "8",
        "--mlp-steps",
        "30",
        "--device",
        "cpu",
    ]


def test_single_process_context_is_identity():
    context = process_context("cpu")
    assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    values = torch.arange(3.0)
    assert context.all_reduce_sum(values) is values
    assert context.gather({"a": 1}) == [{"a": 1}]
    assert context.all_true(False) is False
    module = torch.nn.Linear(2, 2)
    assert ProcessContext().data_parallel(module) is module


def test_two_processes_match_one(model_folders):
    passages = [
        f"{TRAINING_TEXT[i % 8]} {TRAINING_TEXT[(3 * i + 1) % 8]} {TRAINING_TEXT[(5 * i + 2) % 8]}"
        for i in range(48)
    ]
    (model_folders / "long.txt").write_text("\n\n".join(passages))
    environment = dict(os.environ)
    package_root = str(Path(loracast.__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join([package_root, environment.get("PYTHONPATH", "")])
    # CPU processes joined with gloo on this machine only; no user accelerate config is read.
    environment.update(
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HOME=str(model_folders / "hf")
    )
    # accelerate's --cpu flag starts a single process unless MPI is set up, so --multi_gpu
    # starts the two processes (through torchrun) and loracast's --device cpu selects gloo.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "loracast",
    ]
    run = subprocess.run(
        launch + _transfer_args(model_folders, "two", "record-two"),
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("cartridge saved to") == 1  # printed by the main process only

    assert main(_transfer_args(model_folders, "one", "record-one")) == 0

    one, two = (
        Manifest.load(model_folders / "record-one"),
        Manifest.load(model_folders / "record-two"),
    )
    assert len(two.shards) >= 4
    assert one.shards == two.shards
    for record in one.shards.values():
        first = load_file(str(model_folders / "record-one" / record["file"]))
        second = load_file(str(model_folders / "record-two" / record["file"]))
        for key, value in first.items():
            assert torch.equal(value, second[key]), key

    single = load_file(str(model_folders / "one" / "cartridge.safetensors"))
    double = load_file(str(model_folders / "two" / "cartridge.safetensors"))
    assert single.keys() == double.keys()
    for key, value in single.items():
        torch.testing.assert_close(double[key], value, rtol=1e-4, atol=1e-5, msg=key)
    mlp_keys = [key for key in single if ".mlp." in key]
    assert mlp_keys and any(single[key].abs().sum() > 0 for key in mlp_keys)


@pytest.mark.parametrize("argument", ["--corpus-tokens", "--shard-megabytes"])
def test_scale_options_reject_bad_values(model_folders, capsys, argument):
    arguments = _transfer_args(model_folders, "out", "record")
    arguments[arguments.index("--corpus") + 1] = str(model_folders / "corpus.txt")
    assert main([*arguments, argument, "0"]) == 2
    assert argument.lstrip("-").replace("-", "_") in capsys.readouterr().err


def test_close_leaves_the_process_group(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    # The context claims two processes so that close acts. The group itself has one member.
    context = ProcessContext(rank=0, world_size=2)

    context.close()

    assert not torch.distributed.is_initialized()
    context.close()  # a second close does nothing
    assert not torch.distributed.is_initialized()
