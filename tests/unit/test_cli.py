"""The command line on tiny models saved to disk: transfer, generate, and error reporting."""

from __future__ import annotations

import json

from loracast.cli import main


def _transfer_args(folder, out):
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
        str(folder / "corpus.txt"),
        "--out",
        str(out),
        "--max-positions",
        "300",
        "--head",
        "linear",
        "--device",
        "cpu",
    ]


def test_transfer_then_generate(model_folders, capsys):
    out = model_folders / "cartridge"
    assert main(_transfer_args(model_folders, out)) == 0
    config = json.loads((out / "cartridge.json").read_text())
    assert len(config["sites"]) == 8
    assert "cartridge saved to" in capsys.readouterr().out

    assert main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.3.self_attn.v_proj" in table
    assert "decoder R2" in table

    code = main(
        [
            "-q",
            "generate",
            "--target",
            str(model_folders / "target"),
            "--cartridge",
            str(out),
            "--prompt",
            "The market",
            "--max-new-tokens",
            "4",
            "--compare",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "[target base]" in printed
    assert "[target + cartridge, scale 1.0]" in printed


def test_transfer_with_cka_layer_map(model_folders, capsys):
    out = model_folders / "cartridge"
    assert main(_transfer_args(model_folders, out) + ["--layer-map", "cka"]) == 0
    config = json.loads((out / "cartridge.json").read_text())
    layer_map = config["layer_map"]
    # Four source layers onto three target layers, never going back in depth.
    assert len(layer_map) == 4
    assert layer_map == sorted(layer_map)
    assert set(layer_map) <= {0, 1, 2}
    for record in config["sites"]:
        site_layer = int(record["site"].split(".")[2])
        assert record["anchor"].startswith(f"model.layers.{layer_map[site_layer]}.")
    capsys.readouterr()

    recorded = _transfer_args(model_folders, model_folders / "sharded")
    recorded += ["--layer-map", "cka", "--record-dir", str(model_folders / "shards")]
    assert main(recorded) == 2
    assert "record in memory" in capsys.readouterr().err


def test_transfer_refuses_existing_output(model_folders, capsys):
    out = model_folders / "cartridge"
    out.mkdir()
    assert main(_transfer_args(model_folders, out)) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_transfer_reports_missing_adapter(model_folders, capsys):
    args = _transfer_args(model_folders, model_folders / "cartridge")
    args[args.index("--adapter") + 1] = str(model_folders / "nowhere")
    assert main(args) == 2
    assert "adapter folder" in capsys.readouterr().err


def test_bake_writes_a_peft_folder_that_loads(model_folders, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cartridge = model_folders / "cartridge"
    assert main(_transfer_args(model_folders, cartridge)) == 0
    baked = model_folders / "baked"
    code = main(
        [
            "-q",
            "bake",
            "--cartridge",
            str(cartridge),
            "--target",
            str(model_folders / "target"),
            "--corpus",
            str(model_folders / "corpus.txt"),
            "--out",
            str(baked),
            "--max-positions",
            "200",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "baked PEFT LoRA saved to" in printed
    model = AutoModelForCausalLM.from_pretrained(model_folders / "target")
    peft_model = PeftModel.from_pretrained(model, str(baked))
    assert len([name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]) == 6
    assert "loracast bake" in (baked / "README.md").read_text()

    assert (
        main(
            [
                "-q",
                "bake",
                "--cartridge",
                str(cartridge),
                "--target",
                str(model_folders / "target"),
                "--out",
                str(baked),
            ]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err


def _refine_args(model_folders, refined, *options: str) -> list[str]:
    """Return the arguments of ``loracast refine`` on the cartridge of ``_transfer_args``."""
    return [
        "-q",
        "refine",
        "--cartridge",
        str(model_folders / "cartridge"),
        "--source",
        str(model_folders / "source"),
        "--adapter",
        str(model_folders / "adapter"),
        "--target",
        str(model_folders / "target"),
        "--corpus",
        str(model_folders / "corpus.txt"),
        "--out",
        str(refined),
        "--device",
        "cpu",
        *options,
    ]


def test_refine_writes_a_refined_cartridge(model_folders, capsys):
    cartridge = model_folders / "cartridge"
    assert main(_transfer_args(model_folders, cartridge)) == 0
    refined = model_folders / "refined"
    code = main(
        _refine_args(
            model_folders,
            refined,
            "--max-positions",
            "200",
            "--steps",
            "4",
            "--template",
            "Note: {text}\nLabel:",
            "--max-grad-norm",
            "2.5",
        )
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "held-out KL" in printed
    config = json.loads((refined / "cartridge.json").read_text())
    assert config["refinement"]["text"] == "template"
    assert config["refinement"]["report"]["config"]["max_grad_norm"] == 2.5
    assert config["refinement"]["template"] == "Note: {text}\nLabel:"
    assert main(["info", str(refined)]) == 0


def test_refine_on_elicited_text(model_folders, capsys):
    cartridge = model_folders / "cartridge"
    assert main(_transfer_args(model_folders, cartridge)) == 0
    refined = model_folders / "refined"
    arguments = _refine_args(
        model_folders,
        refined,
        "--max-positions",
        "120",
        "--steps",
        "2",
        "--elicited",
        "--prefix-tokens",
        "5",
        "--sequence-weight",
        "0.5",
        "--amplification",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--span-weight",
        "0.5",
    )
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "sampled-token cross-entropy" in printed
    assert "span error" in printed
    config = json.loads((refined / "cartridge.json").read_text())
    assert config["refinement"]["text"] == "elicited"
    assert config["refinement"]["sequence_weight"] == 0.5
    assert config["refinement"]["report"]["config"]["span_weight"] == 0.5
    assert config["refinement"]["report"]["config"]["elicit"]["prefix_tokens"] == 5
    elicit = config["refinement"]["report"]["config"]["elicit"]
    assert (elicit["amplification"], elicit["temperature"], elicit["top_p"]) == (2.0, 0.8, 0.9)

    assert main([*arguments, "--overwrite", "--template", "Note: {text}\nLabel:"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_distil_writes_a_peft_lora_for_the_target(model_folders, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = model_folders / "distilled"
    arguments = [
        "-q",
        "distil",
        "--source",
        str(model_folders / "source"),
        "--adapter",
        str(model_folders / "adapter"),
        "--target",
        str(model_folders / "target"),
        "--corpus",
        str(model_folders / "corpus.txt"),
        "--out",
        str(out),
        "--max-positions",
        "120",
        "--steps",
        "2",
        "--rank",
        "4",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "1",
        "--weight-decay",
        "0.01",
        "--device",
        "cpu",
    ]
    assert main(arguments) == 0
    assert "sampled-token cross-entropy" in capsys.readouterr().out
    record = json.loads((out / "loracast_distillation.json").read_text())
    config = record["report"]["config"]
    assert config["text"] == "elicited"
    assert config["sequence_weight"] == 1.0
    assert (config["lr_schedule"], config["warmup_steps"], config["weight_decay"]) == (
        "cosine",
        1,
        0.01,
    )
    target = AutoModelForCausalLM.from_pretrained(model_folders / "target")
    peft_model = PeftModel.from_pretrained(target, str(out))
    assert peft_model.peft_config["default"].r == 4
    assert not [path.name for path in model_folders.iterdir() if path.name.startswith(".")]

    assert main([*arguments, "--overwrite", "--text", "template"]) == 2
    assert "--text template" in capsys.readouterr().err


def test_transfer_with_record_dir_reuses_recording(model_folders, capsys, caplog):
    record = model_folders / "record"
    arguments = [
        *_transfer_args(model_folders, model_folders / "first"),
        "--record-dir",
        str(record),
    ]
    arguments += ["--corpus-tokens", "150"]
    assert main(arguments) == 0
    manifest = json.loads((record / "manifest.json").read_text())
    assert manifest["complete"]
    assert manifest["identity"]["recording"]["corpus_tokens"] == 150
    # The budget stops after the passage that reaches it; the corpus contains more.
    assert 150 <= manifest["stats"]["source_text_tokens"] < 150 + 128
    first = json.loads((model_folders / "first" / "cartridge.json").read_text())

    arguments[arguments.index(str(model_folders / "first"))] = str(model_folders / "second")
    caplog.clear()
    with caplog.at_level("INFO", logger="loracast"):
        assert main(arguments) == 0
    assert "reusing the complete recording" in caplog.text
    second = json.loads((model_folders / "second" / "cartridge.json").read_text())
    assert [site["metrics"] for site in second["sites"]] == [
        site["metrics"] for site in first["sites"]
    ]

    arguments[arguments.index(str(model_folders / "second"))] = str(model_folders / "third")
    arguments[arguments.index("150")] = "300"
    assert main(arguments) == 2
    assert "recording.corpus_tokens: recorded 150, this run 300" in capsys.readouterr().err


def _eval_args(folder, task, *extra):
    return [
        "-q",
        "eval",
        "--task",
        str(task),
        "--source",
        str(folder / "source"),
        "--adapter",
        str(folder / "adapter"),
        "--target",
        str(folder / "target"),
        "--device",
        "cpu",
        *extra,
    ]


def test_eval_arithmetic_rows(model_folders, capsys):
    assert main(_eval_args(model_folders, "arithmetic", "--limit", "6")) == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "arithmetic, test split, 6 examples (higher is better)"
    assert "exact match" in lines[1]
    assert [line.split("  ")[0] for line in lines[2:]] == [
        "source base",
        "source + adapter",
        "target base",
    ]


def test_eval_user_language_modeling_task(model_folders, capsys):
    task = model_folders / "passages.jsonl"
    task.write_text(
        "".join(json.dumps({"text": f"Passage {i} about markets."}) + "\n" for i in range(4))
    )

    assert main(_eval_args(model_folders, task, "--split", "validation")) == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "passages, validation split, 2 examples (lower is better)"
    assert "bits per byte" in lines[1]
    assert len(lines) == 5


def test_eval_rejects_unknown_task(model_folders, capsys):
    assert main(_eval_args(model_folders, "poetry")) == 2
    error = capsys.readouterr().err

    assert "unknown task 'poetry'" in error
    assert "arithmetic" in error
