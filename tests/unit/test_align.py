"""Alignment properties: every aligned pair covers the same text prefix in both tokenizers."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracast.align import Encoded, aligned_positions, encode, prefix_ends, truncate_text

PIECES = st.sampled_from(
    [
        "the",
        " cat",
        "  ",
        "\n\n",
        "\t",
        "42",
        "3.14",
        "!",
        "?!",
        "...",
        "café",
        "Zürich",
        "🎉",
        "日本語",
        " ",
        "-",
        "don't",
        "1,000",
        "x",
        "ß",
    ]
)
TEXTS = st.lists(st.one_of(PIECES, st.text(min_size=0, max_size=6)), max_size=12).map("".join)


def _prefix_is_complete(encoded: Encoded, index: int) -> bool:
    end = encoded.offsets[index][1]
    text_tokens = [i for i, special in enumerate(encoded.special) if not special]
    before = [encoded.offsets[i][1] for i in text_tokens if i <= index]
    after = [encoded.offsets[i][0] for i in text_tokens if i > index]
    return all(e <= end for e in before) and all(s >= end for s in after)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXTS)
def test_aligned_pairs_cover_same_prefix(text, byte_tokenizer, metaspace_tokenizer):
    first = encode(byte_tokenizer, text)
    second = encode(metaspace_tokenizer, text)
    pairs = aligned_positions(first, second)
    ends = [first.offsets[i][1] for i, _ in pairs]
    assert ends == sorted(set(ends))
    for i, j in pairs:
        assert not first.special[i]
        assert not second.special[j]
        assert first.offsets[i][1] == second.offsets[j][1]
        assert _prefix_is_complete(first, i)
        assert _prefix_is_complete(second, j)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXTS)
def test_byte_level_prefix_decodes_to_text(text, byte_tokenizer):
    encoded = encode(byte_tokenizer, text)
    for end, index in prefix_ends(encoded).items():
        decoded = byte_tokenizer.decode(encoded.input_ids[: index + 1])
        assert decoded == text[:end]


def test_bos_is_never_aligned(byte_tokenizer, metaspace_tokenizer):
    text = "Markets rallied on Tuesday."
    second = encode(metaspace_tokenizer, text)
    assert second.special[0]
    pairs = aligned_positions(encode(byte_tokenizer, text), second)
    assert pairs
    assert all(j != 0 for _, j in pairs)


def test_identical_tokenizers_align_every_token(byte_tokenizer):
    encoded = encode(byte_tokenizer, "The quick brown fox jumps over the lazy dog.")
    pairs = aligned_positions(encoded, encoded)
    assert pairs == [(i, i) for i in range(len(encoded.input_ids))]


def test_byte_fallback_aligns_only_last_piece():
    # Four byte pieces of one emoji share the character span (5, 6).
    encoded = Encoded(
        input_ids=[1, 2, 3, 4, 5, 6],
        offsets=[(0, 5), (5, 6), (5, 6), (5, 6), (5, 6), (6, 8)],
        special=[False] * 6,
    )
    assert prefix_ends(encoded) == {5: 0, 6: 4, 8: 5}


def test_truncate_text_cuts_at_token_boundary(byte_tokenizer):
    text = "Ministers said the new law would cut costs by 12% over five years."
    cut = truncate_text(byte_tokenizer, text, max_tokens=5)
    assert text.startswith(cut)
    assert 0 < len(cut) < len(text)
    assert len(encode(byte_tokenizer, cut).input_ids) <= 5
