"""The behaviour report keeps the direction that was not rerun (benchmarks/behaviour.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_behaviour():
    spec = importlib.util.spec_from_file_location(
        "benchmark_behaviour", ROOT / "benchmarks" / "behaviour.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _result(direction: str, command: str) -> dict:
    row = {
        "method": "target-base",
        "data": "none",
        "score": 0.4,
        "gain_recovered": 0.0,
        "gain_recovered_ci": [0.0, 0.0],
        "negative_flips": 0,
        "push_toward_correct_label": 0.0,
    }
    return {
        "direction": direction,
        "task": "sentiment",
        "n_test": 10,
        "runs": [row],
        "run": {"date": "2026-12-05", "commit": "abc", "command": command, "wall_seconds": 1.0},
    }


def _document(results: list[dict], quick: bool = False) -> dict:
    return {
        "machine": "test",
        "date": "2026-12-05",
        "commit": "abc",
        "command": "python benchmarks/behaviour.py",
        "quick": quick,
        "plan": {},
        "wall_seconds": 1.0,
        "results": results,
    }


def test_report_keeps_the_other_direction(tmp_path):
    behaviour = _load_behaviour()
    forward = _result("a->b", "python benchmarks/behaviour.py")
    behaviour.write_report(_document([forward]), tmp_path)

    reverse = _result("b->a", "python benchmarks/behaviour.py --direction reverse")
    results = behaviour._stored_results(tmp_path / "behaviour.json", reverse, quick=False)
    behaviour.write_report(_document(results), tmp_path)

    saved = json.loads((tmp_path / "behaviour.json").read_text())
    page = (tmp_path / "behaviour.md").read_text()
    assert [result["direction"] for result in saved["results"]] == ["a->b", "b->a"]
    assert "## a->b, sentiment" in page
    assert "## b->a, sentiment" in page
    assert "`python benchmarks/behaviour.py --direction reverse`" in page


def test_results_of_another_mode_are_dropped(tmp_path):
    behaviour = _load_behaviour()
    path = tmp_path / "behaviour.json"
    behaviour.write_report(_document([_result("a->b", "old")], quick=True), tmp_path)
    new = _result("b->a", "new")

    assert behaviour._stored_results(path, new, quick=False) == [new]
    assert behaviour._stored_results(tmp_path / "missing.json", new, quick=False) == [new]


def _scored_row(method: str, gain: float, kl: float) -> dict:
    return {**_student_row(method, gain, kl), "data": "text", "score": 0.5}


def test_rerun_of_some_settings_keeps_the_others(tmp_path):
    behaviour = _load_behaviour()
    earlier = _result("a->b", "python benchmarks/behaviour.py")
    cartridge = _scored_row("cartridge-mlp-seed0", 0.3, 2.0)
    earlier["runs"] += [
        cartridge,
        _scored_row("refined-heads-general", 0.2, 0.45),
        _scored_row("distilled-lora-general", 0.1, 0.6),
        _scored_row("distilled-lora-template", 0.4, 0.4),
    ]
    behaviour.write_report(_document([earlier, _result("b->a", "reverse")]), tmp_path)
    command = "python benchmarks/behaviour.py --settings elicited general --students lora"
    new = _result("a->b", command)
    new["runs"] += [
        {key: value for key, value in cartridge.items() if key != "held_out_kl"},
        _scored_row("distilled-lora-general", 0.15, 0.55),
        _scored_row("distilled-lora-elicited", 0.5, 0.3),
        _scored_row("control-label-bias", 0.8, 0.0),
    ]

    results = behaviour._stored_results(tmp_path / "behaviour.json", new, quick=False)
    behaviour.write_report(_document(results), tmp_path)

    assert [result["direction"] for result in results] == ["a->b", "b->a"]
    merged = {row["method"]: row for row in results[0]["runs"]}
    assert list(merged) == [
        "target-base",
        "cartridge-mlp-seed0",
        "refined-heads-general",
        "distilled-lora-general",
        "distilled-lora-elicited",
        "distilled-lora-template",
        "control-label-bias",
    ]
    assert merged["distilled-lora-general"]["gain_recovered"] == 0.15
    assert "run" not in merged["distilled-lora-general"]
    assert merged["refined-heads-general"]["run"]["command"] == "python benchmarks/behaviour.py"
    assert merged["cartridge-mlp-seed0"]["held_out_kl"] == {"initial": 1.0, "best": 2.0}
    # The kept heads row has the lower KL, but it came from another teacher.
    assert behaviour._chosen(results[0]["runs"], "general") is merged["distilled-lora-general"]
    page = (tmp_path / "behaviour.md").read_text()
    assert "- distilled-lora-template: `python benchmarks/behaviour.py`, commit abc" in page
    assert f"Command: `{command}`" in page


def _corpus_size_row(positions: int, gain: float) -> dict:
    return {
        "method": "distilled-lora-general",
        "positions": positions,
        "passages": positions // 90,
        "score": 0.4 + gain / 10,
        "gain_recovered": gain,
        "gain_recovered_ci": [gain - 0.1, gain + 0.1],
        "push_toward_correct_label": 0.1,
        "behaviour_cosine": 0.2,
        "general_bpb_change": 0.01,
        "train_seconds": 12.0,
    }


def test_report_renders_corpus_sizes(tmp_path):
    behaviour = _load_behaviour()
    forward = _result("a->b", "python benchmarks/behaviour.py")
    forward["corpus_size"] = {
        "rows": [_corpus_size_row(1000, 0.1), _corpus_size_row(4000, 0.3)],
        "run": {
            "date": "2026-12-05",
            "commit": "abc",
            "command": "python benchmarks/behaviour.py --corpus-sizes 1000 4000",
            "wall_seconds": 2.0,
        },
    }
    main_row = {**_corpus_size_row(0, 0.5), "data": "general", "negative_flips": 0}
    del main_row["positions"]  # rows written before students recorded their positions
    forward["runs"].append(main_row)
    document = _document([forward])
    document["plan"] = {"general_positions": 8000}
    behaviour.write_report(document, tmp_path)

    page = (tmp_path / "behaviour.md").read_text()
    assert "against the amount of text (general)" in page
    assert "| 8000 (main table) |  | 0.450 | 0.50 | [0.40, 0.60] |" in page
    assert "| 1000 | 11 | 0.410 | 0.10 | [0.00, 0.20] |" in page
    assert "| 4000 | 44 | 0.430 | 0.30 | [0.20, 0.40] |" in page
    assert "--corpus-sizes 1000 4000" in page


def test_corpus_sizes_of_elicited_text_on_shakespeare(tmp_path):
    behaviour = _load_behaviour()
    result = _result("a->b", "python benchmarks/behaviour.py --task shakespeare")
    result.update(task="shakespeare", metric="bits per byte", higher_is_better=False)
    main_row = {**_corpus_size_row(32000, 0.6), "method": "distilled-lora-elicited-mixed"}
    del main_row["push_toward_correct_label"]
    result["runs"].append({**main_row, "data": "elicited", "negative_flips": None})
    small = {**_corpus_size_row(4000, 0.2), "method": "distilled-lora-elicited-mixed"}
    del small["push_toward_correct_label"]
    result["corpus_size"] = {
        "setting": "elicited-mixed",
        "rows": [small],
        "run": {"date": "d", "commit": "c", "command": "cmd", "wall_seconds": 3.0},
    }
    behaviour.write_report(_document([result]), tmp_path)

    page = (tmp_path / "behaviour.md").read_text()
    assert "### Gain recovered against the amount of text (elicited-mixed)" in page
    assert "| aligned positions | passages | bits per byte (lower is better) |" in page
    assert "| 4000 | 44 | 0.420 | 0.20 | [0.10, 0.30] |  |" in page
    assert "| 32000 (main table) |  | 0.460 | 0.60 |" in page

    # A main row kept from an earlier run without recorded positions takes its command's.
    del result["runs"][-1]["positions"]
    result["runs"][-1]["run"] = {
        "date": "d",
        "commit": "c",
        "command": "python x.py --general-positions 16000",
    }
    behaviour.write_report(_document([result]), tmp_path)
    page = (tmp_path / "behaviour.md").read_text()
    assert "| 16000 (main table) |  | 0.460 | 0.60 |" in page


def test_corpus_sizes_need_main_result(tmp_path):
    behaviour = _load_behaviour()
    arguments = ["--corpus-sizes", "1000", "--out", str(tmp_path), "--cache-dir", str(tmp_path)]

    with pytest.raises(SystemExit) as raised:
        behaviour.main(arguments)

    message = str(raised.value)
    assert "has no sentiment result for smollm2-135m-instruct->gemma-3-270m" in message
    assert "--direction forward` first" in message


def test_benchmark_page_embeds_behaviour(tmp_path):
    behaviour = _load_behaviour()
    report = sys.modules["report"]
    assert report._behaviour_section(tmp_path) == []

    behaviour.write_report(_document([_result("a->b", "python benchmarks/behaviour.py")]), tmp_path)
    section = report._behaviour_section(tmp_path)

    assert section[0] == "## Behaviour matching"
    assert "### a->b, sentiment (10 test examples)" in section
    assert not any(line.startswith("# ") for line in section)


def _student_row(method: str, gain: float, kl: float) -> dict:
    return {
        "method": method,
        "gain_recovered": gain,
        "gain_recovered_ci": [gain - 0.1, gain + 0.1],
        "held_out_kl": {"initial": 1.0, "best": kl},
        "behaviour_cosine": 0.5,
    }


def test_summary_chooses_by_held_out_kl():
    behaviour = _load_behaviour()
    cartridge = _student_row("cartridge-mlp-seed0", 0.3, 2.0)
    cartridge["held_out_kl"] = {"initial": 2.0}
    cartridge["behaviour_cosine"] = 0.1
    result = _result("a->b", "python benchmarks/behaviour.py")
    result["runs"] = [
        cartridge,
        _student_row("refined-heads-general", 0.6, 0.4),
        _student_row("distilled-lora-general", 0.2, 0.3),
        _student_row("refined-heads-template", 0.1, 0.5),
    ]

    lines = behaviour._summary_lines([result])
    table = lines[lines.index("| method | a->b, sentiment |") :]

    assert "| cartridge | 0.30 [0.20, 0.40] |" in table
    assert "| general text only | 0.20 [0.10, 0.30] (distilled) |" in table
    assert "| template | 0.10 [0.00, 0.20] (refined) |" in table
    # Settings no result ran get no row; controls always have one.
    assert not any(line.startswith("| elicited") for line in table)
    assert "| label-bias control | not run |" in table
    assert "| behaviour cosine, cartridge → general | 0.100 → 0.500 |" in table


def test_summary_shows_the_validation_gain():
    behaviour = _load_behaviour()
    student = _student_row("distilled-lora-elicited-mixed", 0.55, 0.3)
    student["validation_gain_recovered"] = 0.61
    result = _result("a->b", "python benchmarks/behaviour.py")
    result["runs"] = [student]

    lines = behaviour._summary_lines([result])

    assert (
        "| elicited, KL + cross-entropy | 0.55 [0.45, 0.65] (distilled; validation 0.61) |" in lines
    )


def test_validation_gains_score_the_validation_split(monkeypatch):
    behaviour = _load_behaviour()
    from tasks import Scores

    # Bits per byte of each model on each validation passage; lower is better.
    bpb = {
        "base": [2.0, 2.0],
        "retrained": [1.0, 1.0],
        "cartridge": [1.5, 1.9],
        "student": [1.2, 1.2],
    }
    seen = []

    def evaluate(model, tokenizer, examples):
        seen.append(list(examples))
        return Scores(values=np.array(bpb[model]), weights=np.array([1.0, 3.0]), correct=None)

    task = replace(behaviour.TASKS["shakespeare"], evaluate=evaluate)
    monkeypatch.setattr(
        behaviour, "_with_adapter", lambda target, folder, function: function(folder)
    )
    monkeypatch.setattr(
        behaviour, "_with_cartridge", lambda target, cartridge, function: function(cartridge)
    )
    target = type("Target", (), {"model": "base", "tokenizer": None})()
    setup = behaviour.Setup(
        source=None,
        target=target,
        passages=[],
        held_out=[],
        task=task,
        test=["test passage"],
        validation=["validation one", "validation two"],
        source_adapter=Path("."),
        retrained="retrained",
        kernels={},
        cartridge="cartridge",
        cka_cartridge="cartridge",
        shared=None,
        task_texts=[],
    )
    students = {"distilled-lora-elicited-mixed": ("adapter", "student", None)}

    gains = behaviour._validation_gains(setup, students)

    assert all(examples == setup.validation for examples in seen)
    # Weighted means: base 2.0, retrained 1.0, cartridge (1.5 + 3 * 1.9) / 4 = 1.8.
    assert gains[behaviour.DEFAULT_BRIDGE] == pytest.approx(0.2)
    assert gains["distilled-lora-elicited-mixed"] == pytest.approx(0.8)
    assert set(gains) == {behaviour.DEFAULT_BRIDGE, behaviour.CKA_BRIDGE, *students}


def test_every_setting_has_a_summary_label():
    behaviour = _load_behaviour()
    assert set(behaviour.SETTING_LABELS) == set(behaviour.SETTINGS)
    assert set(behaviour.DATA) == set(behaviour.SETTINGS)


def test_language_modelling_result_renders_beside_sentiment(tmp_path):
    behaviour = _load_behaviour()
    sentiment = _result("a->b", "python benchmarks/behaviour.py")
    behaviour.write_report(_document([sentiment]), tmp_path)
    shakespeare = _result("a->b", "python benchmarks/behaviour.py --task shakespeare")
    shakespeare.update(task="shakespeare", metric="bits per byte", higher_is_better=False)
    source_row = {"method": "source-adapter", "data": "", "score": 1.7}
    students = [
        _student_row("cartridge-mlp-seed0", 0.1, 1.0),
        _student_row("distilled-lora-elicited", 0.6, 0.2),
    ]
    shakespeare["runs"] = [source_row] + [
        {**row, "data": "text", "score": 1.5, "negative_flips": None} for row in students
    ]
    results = behaviour._stored_results(tmp_path / "behaviour.json", shakespeare, quick=False)
    behaviour.write_report(_document(results), tmp_path)

    page = (tmp_path / "behaviour.md").read_text()
    assert [result["task"] for result in results] == ["sentiment", "shakespeare"]
    assert "| method | data it sees | positions | bits per byte (lower is better) |" in page
    assert "| source-adapter |  |  | 1.700 |  |  |" in page
    assert "| method | a->b, sentiment | a->b, shakespeare |" in page
    # Only Shakespeare ran elicited text, so the sentiment cell of that row reads not run.
    assert "| elicited text, tilted KL | not run | 0.60 [0.50, 0.70] (distilled) |" in page


def test_template_settings_need_sentiment(tmp_path):
    behaviour = _load_behaviour()
    with pytest.raises(SystemExit, match="supports --settings general elicited elicited-sequence"):
        behaviour.run(
            "forward",
            "shakespeare",
            behaviour.Plan.quick(),
            behaviour.Settings.quick(),
            tmp_path,
            tmp_path,
            ("general", "template"),
        )


def test_corpus_sizes_take_one_text_setting(tmp_path):
    behaviour = _load_behaviour()
    forward = _result("smollm2-135m-instruct->gemma-3-270m", "python benchmarks/behaviour.py")
    behaviour.write_report(_document([forward]), tmp_path)
    arguments = ["--corpus-sizes", "1000", "--out", str(tmp_path), "--cache-dir", str(tmp_path)]

    for settings in (["template"], ["general", "elicited"]):
        with pytest.raises(SystemExit, match="measures one setting of general or elicited text"):
            behaviour.main([*arguments, "--settings", *settings])


def test_merge_from_folds_another_report_in(tmp_path):
    behaviour = _load_behaviour()
    published, run = tmp_path / "docs", tmp_path / "run"
    earlier = _result("a->b", "python benchmarks/behaviour.py")
    earlier["runs"].append(_scored_row("distilled-lora-general", 0.1, 0.6))
    behaviour.write_report(_document([earlier]), published)
    rerun = _result("a->b", "python benchmarks/behaviour.py --settings elicited-mixed")
    rerun["run"]["date"] = "2026-12-06"
    rerun["runs"].append(_scored_row("distilled-lora-elicited-mixed", 0.5, 0.3))
    other = _result("b->a", "python benchmarks/behaviour.py --direction reverse")
    behaviour.write_report(_document([rerun, other]), run)
    arguments = ["--merge-from", str(run / "behaviour.json"), "--out", str(published)]

    assert behaviour.main(arguments) == 0

    saved = json.loads((published / "behaviour.json").read_text())
    assert [result["direction"] for result in saved["results"]] == ["a->b", "b->a"]
    methods = [row["method"] for row in saved["results"][0]["runs"]]
    assert methods == ["target-base", "distilled-lora-general", "distilled-lora-elicited-mixed"]
    assert "--settings elicited-mixed" in (published / "behaviour.md").read_text()


def test_merge_from_keeps_newer_results(tmp_path):
    behaviour = _load_behaviour()
    published, run = tmp_path / "docs", tmp_path / "run"
    newer = _result("a->b", "python benchmarks/behaviour.py --settings elicited-mixed")
    newer["run"]["date"] = "2026-12-06"
    behaviour.write_report(_document([newer]), published)
    # A run started from the report before that merge carries a stale copy.
    stale = _result("a->b", "python benchmarks/behaviour.py")
    behaviour.write_report(_document([stale]), run)

    assert (
        behaviour.main(["--merge-from", str(run / "behaviour.json"), "--out", str(published)]) == 0
    )

    saved = json.loads((published / "behaviour.json").read_text())
    assert saved["results"][0]["run"]["command"] == newer["run"]["command"]


def test_settings_map_to_objectives():
    behaviour = _load_behaviour()
    plan = behaviour.Plan(general_positions=500)
    expected = {
        "general": ("general", 1.0, 0.0),
        "elicited": ("elicited", 1.0, 0.0),
        "elicited-sequence": ("elicited", 0.0, 1.0),
        "elicited-mixed": ("elicited", 1.0, 1.0),
        "task-text": ("general", 1.0, 0.0),
        "elicited-nucleus": ("elicited", 1.0, 1.0),
        "elicited-mixed-span": ("elicited", 1.0, 1.0),
    }
    for setting, (text, kl_weight, sequence_weight) in expected.items():
        config = behaviour._refine_config(setting, plan)
        assert (config.text, config.kl_weight, config.sequence_weight) == (
            text,
            kl_weight,
            sequence_weight,
        )
        assert config.max_positions == 500
    assert behaviour._refine_config("elicited-mixed", plan).elicit.top_p == 1.0
    span = behaviour._refine_config("elicited-span", plan)
    assert (span.text, span.kl_weight, span.sequence_weight, span.span_weight) == (
        "elicited",
        1.0,
        0.0,
        1.0,
    )
    assert behaviour._refine_config("elicited-mixed-span", plan).span_weight == 1.0
    assert behaviour._refine_config("elicited-mixed", plan).span_weight == 0.0
    nucleus = behaviour._refine_config("elicited-nucleus", plan).elicit
    assert (nucleus.top_p, nucleus.temperature) == (plan.top_p, plan.temperature)
    centred = behaviour._refine_config("template-centred", plan)
    assert centred.text == "template"
    assert centred.centre_shift


def test_mixed_objective_variants():
    behaviour = _load_behaviour()
    plan = behaviour.Plan(wide_rank=16)
    mixed = behaviour._refine_config("elicited-mixed", plan)
    wide = behaviour._refine_config("elicited-wide", plan)
    dense = behaviour._refine_config("elicited-dense", plan)
    open_prompt = behaviour._refine_config("elicited-open", plan)
    for config in (wide, dense, open_prompt):
        assert (config.text, config.kl_weight, config.sequence_weight) == ("elicited", 1.0, 1.0)
    assert (mixed.lora_rank, mixed.lora_modules) == (8, ("q_proj", "v_proj"))
    assert wide.lora_rank == 16
    assert set(wide.lora_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} | {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    # The wide student differs from the mixed one only in the student, so its teacher is the same.
    assert wide.elicit == mixed.elicit
    assert wide.sequence_tokens == mixed.sequence_tokens
    assert dense.sequence_tokens == dense.elicit.new_tokens
    assert dense.sequence_tokens > mixed.sequence_tokens
    # The open prompt keeps one token and samples the rest: texts are as long as the others.
    assert open_prompt.elicit.prefix_tokens == 1
    total = open_prompt.elicit.prefix_tokens + open_prompt.elicit.new_tokens
    assert total == mixed.elicit.prefix_tokens + mixed.elicit.new_tokens


def test_cosine_setting_changes_only_the_schedule():
    behaviour = _load_behaviour()
    plan = behaviour.Plan(warmup_steps=7)
    mixed = behaviour._refine_config("elicited-mixed", plan)
    cosine = behaviour._refine_config("elicited-cosine", plan)
    assert (mixed.lr_schedule, mixed.warmup_steps) == ("constant", 0)
    assert (cosine.lr_schedule, cosine.warmup_steps) == ("cosine", 7)
    assert replace(cosine, lr_schedule="constant", warmup_steps=0) == mixed
    quick = behaviour.Plan.quick()
    assert behaviour._refine_config("elicited-cosine", quick).warmup_steps < quick.steps


def test_plan_sets_samples_per_prefix():
    behaviour = _load_behaviour()
    plan = behaviour.Plan(samples_per_prefix=3)
    for setting in ("elicited", "elicited-mixed", "elicited-open"):
        assert behaviour._refine_config(setting, plan).elicit.samples_per_prefix == 3
    assert behaviour._refine_config("elicited", behaviour.Plan()).elicit.samples_per_prefix == 1


def test_task_text_teacher_reads_training_pairs(monkeypatch):
    behaviour = _load_behaviour()
    from loracast.eval.arithmetic import arithmetic_splits
    from loracast.refine import RefineReport

    task = behaviour.TASKS["arithmetic"]
    train = arithmetic_splits(seed=0, n_train=3, n_test=2).train
    texts = behaviour.task_texts(task, train)
    assert texts == [f"{example.prompt} {example.answer}\n" for example in train]

    read = {}

    def fake_teacher(source, target, kernels, passages, shared, config):
        read[config.text, len(passages)] = list(passages)
        return object()

    def fake_distil(target, teacher, shared, folder, config):
        return RefineReport(student="lora", config={}, positions=1, validation_positions=1)

    monkeypatch.setattr(behaviour, "build_teacher", fake_teacher)
    monkeypatch.setattr(behaviour, "distil_lora", fake_distil)
    setup = behaviour.Setup(
        source=None,
        target=None,
        passages=["general one", "general two"],
        held_out=[],
        task=task,
        test=[],
        validation=[],
        source_adapter=Path("."),
        retrained=Path("."),
        kernels={},
        cartridge=None,
        cka_cartridge=None,
        shared=None,
        task_texts=texts,
    )
    plan = behaviour.Plan.quick()
    students = behaviour._students(setup, plan, Path("."), ("general", "task-text"), ("lora",))

    assert set(students) == {"distilled-lora-general", "distilled-lora-task-text"}
    assert read == {("general", 2): setup.passages, ("general", 3): texts}


def test_seed_names_round_trip():
    behaviour = _load_behaviour()
    for kind, setting, seed in [
        ("lora", "elicited-mixed", 0),
        ("lora", "elicited-mixed", 2),
        ("heads", "template-centred", 11),
        ("heads", "general", 0),
    ]:
        method = behaviour.student_method(kind, setting, seed)
        assert behaviour.parse_student(method) == (kind, setting, seed)
    assert behaviour.student_method("lora", "general") == "distilled-lora-general"
    assert behaviour.parse_student("cartridge-mlp-seed1") is None
    plan = behaviour.Plan(seed=3)
    config = behaviour._refine_config("elicited-mixed", plan)
    assert (config.seed, config.elicit.seed) == (3, 3)


def test_seed_rows_are_merged_and_summarised(tmp_path):
    behaviour = _load_behaviour()
    # Written before students recorded their positions: the command names them.
    first = _result("a->b", "python benchmarks/behaviour.py --general-positions 100")
    first["runs"] += [
        {
            **_scored_row("distilled-lora-elicited-mixed", 0.5, 0.3),
            "general_bpb_change": 0.05,
        },
        {**_scored_row("distilled-lora-general", 0.2, 0.4), "positions": 100},
    ]
    behaviour.write_report(_document([first]), tmp_path)
    for seed, gain, positions in [(1, 0.6, 100), (2, 0.7, 100), (3, 0.9, 50)]:
        rerun = _result("a->b", f"python benchmarks/behaviour.py --seed {seed}")
        method = behaviour.student_method("lora", "elicited-mixed", seed)
        row = _scored_row(method, gain, 0.2)
        rerun["runs"] += [{**row, "positions": positions, "general_bpb_change": gain / 10}]
        results = behaviour._stored_results(tmp_path / "behaviour.json", rerun, quick=False)
        behaviour.write_report(_document(results), tmp_path)

    rows = results[0]["runs"]
    assert [row["method"] for row in rows[1:]] == [
        "distilled-lora-general",
        "distilled-lora-elicited-mixed",
        "distilled-lora-elicited-mixed-seed1",
        "distilled-lora-elicited-mixed-seed2",
        "distilled-lora-elicited-mixed-seed3",
    ]
    # Seed 3 ran on fewer positions, so it is not one of the seeds of the same plan.
    seeds = behaviour.seed_rows(rows, "distilled-lora-elicited-mixed")
    assert [row["gain_recovered"] for row in seeds] == [0.5, 0.6, 0.7]
    mean, spread = behaviour.seed_spread(seeds)
    assert mean == pytest.approx(0.6)
    assert spread == pytest.approx(0.1)
    # The summary still shows the seed-0 student, not a seed row with a lower objective.
    assert behaviour._chosen(rows, "elicited-mixed")["method"] == "distilled-lora-elicited-mixed"
    page = (tmp_path / "behaviour.md").read_text()
    assert "0.50 [0.40, 0.60] (distilled, 100 positions; 3 seeds 0.60 ± 0.10)" in page
    seed_table = (
        "| distilled-lora-elicited-mixed | 0, 1, 2 | 0.50, 0.60, 0.70 | 0.60 ± 0.10 | 0.0600 |"
    )
    assert seed_table in page
    assert "| distilled-lora-elicited-mixed-seed3 | text | 50 | 0.500 | 0.90 |" in page
    assert "| distilled-lora-elicited-mixed | text | 100 | 0.500 | 0.50 |" in page


def test_student_positions_of_older_rows():
    behaviour = _load_behaviour()
    plan = behaviour.Plan()
    old_run = {"command": "python benchmarks/behaviour.py --template-passages 50"}
    cases = [
        ({"method": "distilled-lora-general", "positions": 7}, 7),
        ({"method": "distilled-lora-template", "run": old_run}, 50),
        ({"method": "refined-heads-general", "run": old_run}, plan.general_positions),
        ({"method": "distilled-lora-elicited", "run": {"plan": {"general_positions": 9}}}, 9),
        ({"method": "distilled-lora-general"}, None),
        ({"method": "target-base", "run": old_run}, None),
    ]
    for row, expected in cases:
        assert behaviour.student_positions(row) == expected, row


def test_choice_uses_latest_run_of_setting():
    behaviour = _load_behaviour()
    older = {"date": "2026-12-05T10:00:00+00:00", "command": "old"}
    newer = {"date": "2026-12-05T12:00:00+00:00", "command": "new"}
    rows = [
        {**_student_row("refined-heads-elicited", 0.1, 0.2), "run": older},
        {**_student_row("distilled-lora-elicited", 0.4, 0.5), "run": newer},
        # A later seed of another setting does not make the elicited rows incomparable.
        _student_row("distilled-lora-elicited-mixed-seed1", 0.5, 0.1),
    ]
    assert behaviour._chosen(rows, "elicited")["method"] == "distilled-lora-elicited"
    rows.append(_student_row("refined-heads-elicited", 0.3, 0.6))
    assert behaviour._chosen(rows, "elicited") is rows[-1]
