"""Hand-worked expectations for seq_aligner on the real Stable Diffusion v1 CLIP tokenizer."""

from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

import seq_aligner as sa
from stylediffusion.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "stylediffusion" / "assets" / "clip_tokenizer"


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"), model_max_length=77)


def test_tokenizer_splits_used_below(tok):
    # The expectations below depend on these splits; make them explicit.
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok.tokenize("cat")) == 1 and len(tok.tokenize("dog")) == 1
    assert tok.tokenize("armadillo") == ["armad", "illo</w>"]
    assert tok.tokenize("xylophonist") == ["xy", "lo", "ph", "onist</w>"]


@pytest.mark.parametrize("prompt", ["a photo of a tabby, xylophonist.", "A Hello-World  armadillo!", ""])
def test_word_by_word_tokens_match_whole_prompt(tok, prompt):
    per_word = sa._word_tokens(prompt, tok, 77)
    assert [t for w in per_word for t in w] == tok(prompt, add_special_tokens=False).input_ids


def test_words_splits_on_whitespace():
    assert sa.words("  a photo\tof a\ncat, ") == ["a", "photo", "of", "a", "cat,"]


def test_word_token_indices(tok):
    p = "a photo of a xylophonist"
    assert sa.word_token_indices(p, "xylophonist", tok) == [5, 6, 7, 8]
    assert sa.word_token_indices(p, 4, tok) == [5, 6, 7, 8]
    assert sa.word_token_indices(p, 1, tok) == [2]
    assert sa.word_token_indices(p, "a", tok) == [1, 4]  # every occurrence
    assert sa.word_token_indices(p, ["photo", 4], tok) == [2, 5, 6, 7, 8]
    # case-insensitive, trailing punctuation ignored, punctuation token belongs to its word
    assert sa.word_token_indices("a Tabby, cat", "tabby", tok) == [2, 3]
    assert sa.word_token_indices("a black cat", "black cat", tok) == [2, 3]


@pytest.mark.parametrize("word", ["dog", 5, -1, "", True, []])
def test_word_token_indices_errors(tok, word):
    with pytest.raises(UserError):
        sa.word_token_indices("a photo of a cat", word, tok)


def test_unknown_word_error_names_word_and_prompt_words(tok):
    with pytest.raises(UserError, match=r"'dog'.*\['a', 'photo', 'of', 'a', 'cat'\]"):
        sa.word_token_indices("a photo of a cat", "dog", tok)


def test_replacement_single_token_word_is_identity(tok):
    m = sa.replacement_mapper("a photo of a cat", "a photo of a dog", tok)
    assert m.shape == (77, 77) and m.dtype == torch.float32
    assert torch.equal(m, torch.eye(77))


def test_replacement_target_word_splits_in_two(tok):
    m = sa.replacement_mapper("a photo of a cat", "a photo of a armadillo", tok)
    # source: [SOT a photo of a cat EOT pad...]; target: [SOT a photo of a armad illo EOT pad...]
    for k in range(5):
        assert m[k, k] == 1
    # P2P: "cat" is spread over the two target tokens with weight 1/n_t = 1/2 (its row sums to 1)
    assert m[5, 5] == 0.5 and m[5, 6] == 0.5
    assert m[6, 7] == 1  # source end token -> target end token, shifted by one
    assert m[:, 6].sum() == 0.5 and m[6, 6] == 0
    for s in range(6, 76):
        assert m[s, s + 1] == 1
    assert m[76].sum() == 0  # shifted past max_len: dropped
    assert torch.equal(m.sum(1)[:76], torch.ones(76))  # every kept source row sums to 1
    assert m.sum() == 76


def test_replacement_source_word_splits_in_two(tok):
    m = sa.replacement_mapper("a photo of a armadillo", "a photo of a cat", tok)
    assert m[5, 5] == 1 and m[6, 5] == 1  # 1/n_t with n_t = 1: "cat" takes armad + illo
    assert m[7, 6] == 1  # end token shifted back by one
    assert m[76, 75] == 1
    assert m[:, 76].sum() == 0  # no source token left for the last padding slot
    assert torch.equal(m.sum(1), torch.ones(77))


def test_replacement_multi_to_multi_token_word(tok):
    m = sa.replacement_mapper("a xylophonist", "a armadillo", tok)
    assert torch.equal(m[2:6, 2:4], torch.full((4, 2), 0.5))
    assert m[6, 4] == 1


def test_replacement_equal_token_count_maps_token_for_token(tok):
    # armadillo -> meerkat, two tokens each: P2P pairs them in order instead of averaging
    assert tok.tokenize("meerkat") == ["meer", "kat</w>"]
    m = sa.replacement_mapper("a armadillo", "a meerkat", tok)
    assert torch.equal(m, torch.eye(77))


def test_replacement_word_count_mismatch(tok):
    with pytest.raises(UserError, match="Replacement needs equal word counts.*Refinement"):
        sa.replacement_mapper("a photo of a cat", "a photo of a black cat", tok)


def test_too_long_prompt_is_refused(tok):
    with pytest.raises(UserError, match="shorten"):
        sa.replacement_mapper("cat " * 76, "dog " * 76, tok)


def test_refinement_inserted_word(tok):
    mapper, alphas = sa.refinement_mapper("a photo of a cat", "a photo of a black cat", tok)
    assert mapper.dtype == torch.long and alphas.shape == (77,)
    expected_alphas = torch.ones(77)
    expected_alphas[5] = 0  # "black"
    assert torch.equal(alphas, expected_alphas)
    assert mapper[:5].tolist() == [0, 1, 2, 3, 4]
    assert mapper[6] == 5 and mapper[7] == 6  # "cat" and end token
    assert mapper[8:].tolist() == list(range(8, 77))  # padding: same position, as P2P's get_mapper
    assert 0 <= mapper[5] < 77


def test_refinement_removed_word(tok):
    mapper, alphas = sa.refinement_mapper("a photo of a black cat", "a photo of a cat", tok)
    assert torch.equal(alphas, torch.ones(77))
    assert mapper[:7].tolist() == [0, 1, 2, 3, 4, 6, 7]
    assert mapper[7:].tolist() == list(range(7, 77))


def test_refinement_tie_break_repeated_token(tok):
    # target "a a cat": P2P's traceback prefers a gap in the target, so the FIRST "a" pairs with the
    # source "a" and the second one is inserted.
    mapper, alphas = sa.refinement_mapper("a cat", "a a cat", tok)
    assert alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert mapper[1] == 1 and mapper[3] == 2 and mapper[4] == 3


def test_refinement_identical_is_identity(tok):
    mapper, alphas = sa.refinement_mapper("a cat", "a cat", tok)
    assert mapper.tolist() == list(range(77)) and torch.equal(alphas, torch.ones(77))


@pytest.mark.parametrize(
    "params",
    [
        {"words": ["silver", "sculpture"], "values": [2, 2]},
        {"silver": 2, "sculpture": 2.0},
        (["silver", "sculpture"], [2, 2]),
        {"words": ["silver", "sculpture"], "values": 2},
    ],
)
def test_reweight_vector_forms(tok, params):
    v = sa.reweight_vector("a silver sculpture of a cat", params, tok)
    expected = torch.ones(77)
    expected[[2, 3]] = 2
    assert torch.equal(v, expected)


def test_reweight_vector_multi_token_and_index(tok):
    v = sa.reweight_vector("a photo of a xylophonist", {"xylophonist": 0.5, 1: 3}, tok)
    expected = torch.ones(77)
    expected[5:9] = 0.5
    expected[2] = 3
    assert torch.equal(v, expected)


def test_reweight_word_named_twice_takes_the_last_factor(tok):
    # P2P's get_equalizer assigns: the later factor replaces the earlier one (no product 2 * 3 = 6)
    v = sa.reweight_vector("a photo of a cat", {"words": ["cat", "cat"], "values": [2, 3]}, tok)
    assert v[5] == 3 and v.sum() == 76 + 3


@pytest.mark.parametrize(
    "params",
    [{"dog": 2}, {"words": ["cat", "photo"], "values": [2]}, {"cat": "big"}, "cat", {"cat": float("nan")}],
)
def test_reweight_vector_errors(tok, params):
    with pytest.raises(UserError):
        sa.reweight_vector("a photo of a cat", params, tok)
