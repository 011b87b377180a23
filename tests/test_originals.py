"""Our Prompt-to-Prompt pieces against the public originals, on the real SD v1 tokenizer.

The originals are google/prompt-to-prompt (``seq_aligner.py``: ``get_replacement_mapper``,
``get_refinement_mapper``, ``get_word_inds``; ``ptp_utils.py``: ``get_time_words_attention_alpha``;
the notebooks' ``LocalBlend``, ``get_equalizer`` and step counts) and the StyleDiffusion authors'
``edit_w_ptp_v_clip.py`` (tau_v, P2Plus's unconditional self-attention). Every expected value below
was derived by working through what their code does on these token sequences and is written out
literally; none is computed from our code. Where we deliberately differ (the original is wrong or
silently ignores input), the row or test says so and docs/method.md explains it.

Mapper notation: one item per target position from the start token to the end token; each item
lists the source positions that feed it: ``5`` = source 5 with weight 1, ``5/2`` = weight 1/2,
``2+3`` = sources 2 and 3. Past the end token the padding follows shifted so both end tokens line
up (Replacement) or at the same position (Refinement). Refinement items: the source position of
each target token, ``-`` for a token with no counterpart (alpha 0: it keeps its own map).
"""
import pytest
import torch

import seq_aligner as sa
from ptp_utils import LocalBlend
from stylediffusion.editing import EditSpec, build_controller, cross_alpha, num_steps_for, value_steps_for
from stylediffusion.errors import UserError
from stylediffusion.models import sd_tokenizer


@pytest.fixture(scope="module")
def tok():
    return sd_tokenizer()


def test_token_splits_the_tables_rely_on(tok):
    splits = {"cat": 1, "dog": 1, "tiger": 1, "armadillo": 2, "meerkat": 2, "capybara": 3, "xylophonist": 4,
              "cat,": 2, "dog.": 2, "Hello-World": 3}
    assert {w: len(tok.tokenize(w)) for w in splits} == splits
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# (source, target, expected target columns, how the original differs)
REPLACEMENT = [
    ('a photo of a cat', 'a photo of a dog', '0 1 2 3 4 5 6', ''),
    ('a photo of a cat', 'a photo of a tiger', '0 1 2 3 4 5 6', ''),
    ('a photo of a cat', 'a photo of a armadillo', '0 1 2 3 4 5/2 5/2 6', 'original: tail not shifted'),
    ('a photo of a armadillo', 'a photo of a cat', '0 1 2 3 4 5+6 7', 'original: tail not shifted'),
    ('a photo of a cat', 'a photo of a xylophonist', '0 1 2 3 4 5/4 5/4 5/4 5/4 6', 'original: tail not shifted'),
    ('a xylophonist', 'a armadillo', '0 1 2/2+3/2+4/2+5/2 2/2+3/2+4/2+5/2 6', 'original: tail not shifted'),
    ('a armadillo', 'a meerkat', '0 1 2 3 4', ''),
    ('a armadillo on the grass', 'a meerkat on the grass', '0 1 2 3 4 5 6 7', ''),
    ('a cat on the grass', 'a armadillo on the grass', '0 1 2/2 2/2 3 4 5 6', 'original: tail not shifted'),
    ('a armadillo on the grass', 'a cat on the grass', '0 1 2+3 4 5 6 7', 'original: tail not shifted'),
    ('a cat and a dog', 'a armadillo and a dog', '0 1 2/2 2/2 3 4 5 6', 'original: tail not shifted'),
    ('a cat and a dog', 'a cat and a armadillo', '0 1 2 3 4 5/2 5/2 6', 'original: tail not shifted'),
    ('a cat and a dog', 'a armadillo and a meerkat', '0 1 2/2 2/2 3 4 5/2 5/2 6', 'original: tail not shifted'),
    ('a cat and a dog', 'a armadillo and a capybara', '0 1 2/2 2/2 3 4 5/3 5/3 5/3 6', 'original: tail not shifted'),
    ('a armadillo and a dog', 'a cat and a capybara', '0 1 2+3 4 5 6/3 6/3 6/3 7', 'original: tail not shifted'),
    ('a cat and a cat', 'a dog and a cat', '0 1 2 3 4 5 6', ''),
    ('a cat and a cat', 'a cat and a dog', '0 1 2 3 4 5 6', ''),
    ('a cat and a cat', 'a dog and a dog', '0 1 2 3 4 5 6', ''),
    ('a cat and a cat', 'a armadillo and a cat', '0 1 2/2 2/2 3 4 5 6', 'original: tail not shifted'),
    ('a Cat on a mat', 'a cat on a mat', '0 1 2 3 4 5 6', ''),
    ('A photo of a cat', 'A photo of a Dog', '0 1 2 3 4 5 6', ''),
    ('a photo of a CAT', 'a photo of a armadillo', '0 1 2 3 4 5/2 5/2 6', 'original: tail not shifted'),
    ('a cat, on a mat', 'a dog, on a mat', '0 1 2 3 4 5 6 7', ''),
    ('a cat, on a mat', 'a armadillo, on a mat', '0 1 2/3+3/3 2/3+3/3 2/3+3/3 4 5 6 7', 'original: tail not shifted'),
    ('a photo of a cat.', 'a photo of a dog.', '0 1 2 3 4 5 6 7', ''),
    ('a photo of a cat.', 'a photo of a meerkat.', '0 1 2 3 4 5/3+6/3 5/3+6/3 5/3+6/3 7', 'original: tail not shifted'),
    ('a photo of a cat!', 'a photo of a dog?', '0 1 2 3 4 5 6 7', ''),
    (
        'black and white dog playing red ball on black carpet',
        'black and white tiger playing red ball on black carpet',
        '0 1 2 3 4 5 6 7 8 9 10 11',
        '',
    ),
    (
        'black and white dog playing red ball on black carpet',
        'black and white cat playing red ball on black carpet',
        '0 1 2 3 4 5 6 7 8 9 10 11',
        '',
    ),
    (
        'black and white dog playing red ball on black carpet',
        'black and white dog playing blue ball on black carpet',
        '0 1 2 3 4 5 6 7 8 9 10 11',
        '',
    ),
    ('a cup of coffee on a table', 'a cup of tea on a table', '0 1 2 3 4 5 6 7 8', ''),
    ('a red car', 'a blue car', '0 1 2 3 4', ''),
    ('a meerkat', 'a capybara', '0 1 2/3+3/3 2/3+3/3 2/3+3/3 4', 'original: tail not shifted'),
    ('a capybara', 'a meerkat', '0 1 2/2+3/2+4/2 2/2+3/2+4/2 5', 'original: tail not shifted'),
    ('a photo of a cat', 'a sketch of a dog', '0 1 2 3 4 5 6', ''),
    ('a cat', 'a cat', '0 1 2 3', ''),
    ('a  cat', 'a  dog', '0 1 2 3', 'original: IndexError (the double space makes an empty word)'),
    ('a cat  on a mat', 'a dog  on a mat', '0 1 2 3 4 5 6', ''),
]


REFINEMENT = [
    ('a photo of a cat', 'a photo of a black cat', '0 1 2 3 4 - 5 6'),
    ('a photo of a black cat', 'a photo of a cat', '0 1 2 3 4 6 7'),
    ('a photo of a cat', 'a photo of a cat wearing a hat', '0 1 2 3 4 5 - - - 6'),
    ('a photo of a cat', 'a watercolor painting of a cat', '0 1 - - 3 4 5 6'),
    ('a cat', 'a a cat', '0 1 - 2 3'),
    ('a cat', 'a cat cat', '0 1 2 - 3'),
    ('a cat', 'a cat and a cat', '0 1 2 - - - 3'),
    ('a cat and a dog', 'a cat and a black dog', '0 1 2 3 4 - 5 6'),
    ('a cat and a dog', 'a black cat and a dog', '0 1 - 2 3 4 5 6'),
    ('a cat sitting next to a mirror', 'a cat sitting next to a mirror in the rain', '0 1 2 3 4 5 6 7 - - - 8'),
    ('a cat sitting next to a mirror', 'a tiger sitting next to a mirror', '0 1 - 3 4 5 6 7 8'),
    ('a photo of a cat', 'a photo of a armadillo', '0 1 2 3 4 - - 6'),
    ('a photo of a cat', 'a photo of a armadillo cat', '0 1 2 3 4 - - 5 6'),
    ('a photo of a armadillo', 'a photo of a armadillo and a meerkat', '0 1 2 3 4 5 6 - - - - 7'),
    ('a photo of a armadillo', 'a photo of a big armadillo', '0 1 2 3 4 - 5 6 7'),
    ('a cup of coffee on a table', 'a cup of coffee on a wooden table', '0 1 2 3 4 5 6 - 7 8'),
    ('a cup of coffee on a table', 'a cup of hot coffee on a wooden table', '0 1 2 3 - 4 5 6 - 7 8'),
    ('black and white cat on floor', 'black and white cat on wooden floor', '0 1 2 3 4 5 - 6 7'),
    ('black and white cat on floor', 'black cat on floor', '0 1 4 5 6 7'),
    ('a Cat', 'a black Cat', '0 1 - 2 3'),
    ('A cat', 'a cat', '0 1 2 3'),
    ('a cat.', 'a black cat.', '0 1 - 2 3 4'),
    ('a cat, a dog', 'a cat, a black dog', '0 1 2 3 4 - 5 6'),
    ('a cat,', 'a cat, smiling', '0 1 2 3 - 4'),
    ('a  cat', 'a black  cat', '0 1 - 2 3'),
    ('a cat  on a mat', 'a cat on a red mat', '0 1 2 3 4 - 5 6'),
    ('a dog', 'a dog dog dog', '0 1 2 - - 3'),
    ('a dog dog', 'a dog', '0 1 2 4'),
    ('a cat on a mat', 'a mat on a cat', '0 1 - 3 4 - 6'),
    ('a red ball', 'a red red ball', '0 1 2 - 3 4'),
    ('the cat', 'the cat the', '0 1 2 - 3'),
    ('a photo of a cat', 'a photo of a xylophonist cat', '0 1 2 3 4 - - - - 5 6'),
    ('a photo of a cat', 'photo of cat', '0 2 3 5 6'),
]


def _parse_columns(spec: str) -> list[dict[int, float]]:
    cols = []
    for item in spec.split():
        col = {}
        for part in item.split("+"):
            s, _, d = part.partition("/")
            col[int(s)] = 1.0 / int(d) if d else 1.0
        cols.append(col)
    return cols


def test_tables_cover_at_least_60_prompt_pairs():
    assert len({(s, t) for s, t, *_ in REPLACEMENT}) == len(REPLACEMENT)
    assert len({(s, t) for s, t, *_ in REFINEMENT}) == len(REFINEMENT)
    assert len({(s, t) for s, t, *_ in REPLACEMENT + REFINEMENT}) >= 60


@pytest.mark.parametrize("source, target, expected, original_differs", REPLACEMENT)
def test_replacement_mapper_matches_prompt_to_prompt(tok, source, target, expected, original_differs):
    m = sa.replacement_mapper(source, target, tok)
    cols = _parse_columns(expected)
    tgt_end = len(cols) - 1
    src_end = len(tok.encode(source)) - 1
    assert tgt_end == len(tok.encode(target)) - 1
    for t, col in enumerate(cols):
        got = {s: round(v, 6) for s, v in enumerate(m[:, t].tolist()) if v != 0}
        assert got == {s: round(v, 6) for s, v in col.items()}, f"target position {t}"
    shift = tgt_end - src_end
    for t in range(tgt_end + 1, 77):
        s = t - shift
        expected_col = torch.zeros(77)
        if s < 77:
            expected_col[s] = 1.0
        assert torch.equal(m[:, t], expected_col), f"padding position {t}"


@pytest.mark.parametrize("source, target, expected", REFINEMENT)
def test_refinement_mapper_matches_prompt_to_prompt(tok, source, target, expected):
    mapper, alphas = sa.refinement_mapper(source, target, tok)
    items = expected.split()
    assert len(items) == len(tok.encode(target))
    for j, item in enumerate(items):
        if item == "-":
            assert alphas[j] == 0, f"target token {j} should keep its own map"
        else:
            assert alphas[j] == 1 and mapper[j] == int(item), f"target token {j}"
    assert mapper[len(items):].tolist() == list(range(len(items), 77))  # padding: same position
    assert alphas[len(items):].eq(1).all()


def test_original_replacement_tail_is_not_shifted_ours_is(tok):
    """Deviation (the original's bug): after the last replaced word P2P writes mapper[j, j], not
    mapper[i, j], so when the token count changed the end token and padding are misaligned.
    For "a photo of a cat" -> "a photo of a armadillo" (target one token longer) the original gives
    target end token 7 the map of source position 7 (a padding token) and sends the source end token
    (6) nowhere; for the reverse swap it gives target end token 6 the map of source 6 ("illo") on top
    of its 1/1 share of "cat". Ours maps end token to end token."""
    m = sa.replacement_mapper("a photo of a cat", "a photo of a armadillo", tok)
    assert m[6, 7] == 1 and m[7, 7] == 0 and m[6].sum() == 1  # original: m[7, 7] = 1, m[6].sum() = 0
    r = sa.replacement_mapper("a photo of a armadillo", "a photo of a cat", tok)
    assert r[7, 6] == 1 and r[6].tolist().count(1.0) == 1 and r[6, 5] == 1  # original: r[6, 6] = 1, r[7, 6] = 0


def test_double_space_replacement_works_where_the_original_fails(tok):
    """Deviation: the original splits words on single spaces, so "a  cat" has an empty word that
    takes the next token in get_word_inds and the replacement mapper raises IndexError. We split on
    any whitespace, as the tokenizer does."""
    assert torch.equal(sa.replacement_mapper("a  cat", "a  dog", tok), torch.eye(77))


# (prompt, word, token positions): P2P's get_word_inds, where ours agrees
WORD_INDS = [
    ("a photo of a cat", "cat", [5]),
    ("a photo of a cat", 4, [5]),
    ("a photo of a xylophonist", "xylophonist", [5, 6, 7, 8]),
    ("a photo of a xylophonist", 4, [5, 6, 7, 8]),
    ("a cat and a cat", "cat", [2, 5]),
    ("a cat and a cat", "a", [1, 4]),
    ("a cat and a cat", 3, [4]),
    ("a Cat", "Cat", [2]),
    ("A photo of a CAT", "CAT", [5]),
    ("a cat,", "cat,", [2, 3]),
    ("a cat, a dog.", "dog.", [5, 6]),
    ("a cat, a dog.", 3, [5, 6]),
    ("a Hello-World armadillo", "Hello-World", [2, 3, 4]),
    ("a Hello-World armadillo", "armadillo", [5, 6]),
    ("black and white dog playing red ball on black carpet", "black", [1, 9]),
    ("black and white dog playing red ball on black carpet", "carpet", [10]),
    ("a photo of a armadillo and a meerkat", "meerkat", [9, 10]),
]


@pytest.mark.parametrize("prompt, word, expected", WORD_INDS)
def test_word_indices_match_get_word_inds(tok, prompt, word, expected):
    assert sa.word_token_indices(prompt, word, tok) == expected


@pytest.mark.parametrize("prompt, word, original, ours", [
    ("a Cat", "cat", [], [2]),  # exact, case-sensitive string match in the original
    ("a cat,", "cat", [], [2, 3]),  # the original needs the punctuation typed too
    ("a black cat", "black cat", [], [2, 3]),  # a phrase never equals one split word
    ("a  cat", "cat", [], [2]),  # the empty word of the double space takes "cat"'s token
    ("a cat  on a mat", "mat", [], [5]),  # ... and every word after it is shifted
])
def test_word_lookup_deviations(tok, prompt, word, original, ours):
    """Deviation (documented): where the original finds nothing it silently skips the word (no blend
    mask, no per-word tau_c, no re-weighting); we normalise case and trailing punctuation, match
    phrases, split on any whitespace, and refuse words that are not in the prompt."""
    assert original == [] and sa.word_token_indices(prompt, word, tok) == ours


def test_unknown_word_is_refused_not_skipped(tok):
    with pytest.raises(UserError):  # the original returns [] and the edit silently does nothing
        sa.word_token_indices("a photo of a cat", "dog", tok)


# ----------------------------------------------------------------------------- re-weighting
@pytest.mark.parametrize("prompt, params, expected", [
    ("a silver sculpture of a cat", {"words": ["silver"], "values": [2]}, {2: 2}),
    ("a photo of a xylophonist", {"words": ["xylophonist"], "values": [0.5]}, {5: .5, 6: .5, 7: .5, 8: .5}),
    ("a cat and a cat", {"words": ["cat"], "values": [3]}, {2: 3, 5: 3}),
    ("a cat, smiling", {"words": ["cat,"], "values": [-1]}, {2: -1, 3: -1}),
    ("a photo of a cat", {"words": ["cat", "cat"], "values": [2, 5]}, {5: 5}),  # assigned: the last wins
    ("a red cat", {"words": [1, "red"], "values": [2, 4]}, {2: 4}),
    ("a red cat", {"words": ["red", "cat"], "values": [2, 0]}, {2: 2, 3: 0}),
])
def test_equalizer_matches_get_equalizer(tok, prompt, params, expected):
    want = torch.ones(77)
    for k, v in expected.items():
        want[k] = v
    assert torch.equal(sa.reweight_vector(prompt, params, tok), want)


# ----------------------------------------------------------------------------- step counts
@pytest.mark.parametrize("T, tau, steps", [
    (30, 0.6, 18), (30, 0.5, 15), (30, 0.8, 24), (30, 0.2, 6), (30, 0.0, 0), (30, 1.0, 30),
    (50, 0.8, 40), (50, 0.4, 20), (50, 0.6, 30), (10, 0.55, 5), (20, 0.33, 6),
])
def test_tau_s_tau_u_cover_int_tau_T_steps(T, tau, steps):
    """P2P/StyleDiffusion: self-attention replaced while num_self_replace[0] <= i < int(T * tau)."""
    assert num_steps_for(tau, T) == steps


def test_float_noise_in_int_tau_T_is_rounded_away():
    """Deviation (documented): int(0.58 * 50) = 28 and int(0.29 * 100) = 28 in the original (the
    products are 28.999999999999996); we count 29, the mathematically intended value."""
    assert num_steps_for(0.58, 50) == 29 and num_steps_for(0.29, 100) == 29


@pytest.mark.parametrize("T, tau_v, steps", [
    (30, 0.5, 15), (30, 0.55, 17), (30, 0.6, 18), (30, 0.4, 12), (50, 0.6, 30), (50, 0.41, 21),
    (10, 0.55, 6), (10, 0.01, 1), (10, 0.0, 0), (10, 1.0, 10),
])
def test_tau_v_covers_i_below_tau_v_T(T, tau_v, steps):
    """The authors' edit loop: trainer.i = i if i < NUM_DDIM_STEPS * v_replace_steps else None."""
    assert value_steps_for(tau_v, T) == steps == sum(i < T * tau_v for i in range(T))


def test_tau_v_float_noise_above_an_integer_is_rounded_away():
    """Deviation (documented): 0.56 * 50 = 28.000000000000004, so the original's i < 28.000000000000004
    also takes step 28 (29 steps); we count 28."""
    assert value_steps_for(0.56, 50) == 28 and sum(i < 50 * 0.56 for i in range(50)) == 29


def _steps_per_token(alpha: torch.Tensor, positions) -> list[int]:
    return [int(alpha[:, 0, p].sum()) for p in positions]


@pytest.mark.parametrize("T, tau_c, target, positions, steps", [
    # the index row 1 of the authors' CSV: wooden keeps the replaced maps only for int(.2 T) steps
    (30, {"default_": .6, "wooden": .2}, "a cup of coffee on a wooden table", [1, 7, 8, 9, 20], [18, 6, 18, 18, 18]),
    (50, {"default_": .8, "wooden": .4}, "a cup of coffee on a wooden table", [7, 8], [20, 40]),
    (30, {"wooden": .2}, "a cup of coffee on a wooden table", [6, 7], [30, 6]),  # no default_: all steps
    (30, .6, "a photo of a cat", [0, 5, 76], [18, 18, 18]),
    (30, {"default_": .6, "xylophonist": 1.0}, "a photo of a xylophonist", [4, 5, 6, 7, 8, 9],
     [18, 30, 30, 30, 30, 18]),
    (30, {"default_": .6, "cat": .1}, "a cat and a cat", [2, 3, 5], [3, 18, 3]),  # every occurrence
])
def test_per_word_tau_c_dictionary(tok, T, tau_c, target, positions, steps):
    """get_time_words_attention_alpha: default_ on every token, then each word's own fraction on the
    target prompt's tokens of that word; the replacement covers the first steps only."""
    alpha = cross_alpha(EditSpec(target, target, tau_c=tau_c), tok, T)  # only the target's words count
    assert alpha.shape == (T, 1, 77)
    assert _steps_per_token(alpha, positions) == steps
    for p in positions:  # a prefix of the steps, never a gap
        n = int(alpha[:, 0, p].sum())
        assert alpha[:n, 0, p].eq(1).all() and alpha[n:, 0, p].eq(0).all()


@pytest.mark.parametrize("T, tau, original, ours", [(10, 0.95, 10, 9), (30, 0.97, 30, 29), (4, 0.8, 4, 3),
                                                    (30, 0.6, 18, 18), (50, 0.8, 40, 40)])
def test_tau_c_rows_deviation(tok, T, tau, original, ours):
    """Deviation (the original's bug): its alpha has T + 1 rows and the fraction is taken of T + 1,
    so tau_c covers int(tau (T + 1)) steps (capped at T); ours covers int(tau T), like tau_s and the
    paper's definition. They differ only when tau is close to 1 or T is small (the rows above)."""
    assert min(T, int(tau * (T + 1))) == original
    alpha = cross_alpha(EditSpec("a cat", "a dog", tau_c=tau), tok, T)
    assert alpha.shape[0] == T and int(alpha[:, 0, 2].sum()) == ours


# ----------------------------------------------------------------------------- LocalBlend
@pytest.mark.parametrize("T, first_blended", [(30, 6), (50, 10), (10, 2), (4, 0)])
def test_local_blend_starts_at_step_int_point_2_T(T, first_blended):
    """P2P: counter += 1 before the test counter > int(0.2 T), so 0-based step i blends from
    i = int(0.2 T) on (T = 50: steps 10..49)."""
    words = torch.zeros(2, 77)
    words[:, 5] = 1
    blend = LocalBlend(words, num_steps=T)
    maps = torch.rand(2, 16, 77)
    latents = torch.randn(2, 4, 16, 16)
    if first_blended > 0:
        assert torch.equal(blend(latents, maps, first_blended - 1), latents)
    blend(latents, maps, first_blended)
    assert blend.last_mask is not None


def test_local_blend_words_and_threshold_from_the_edit(tok):
    ctrl = build_controller(
        EditSpec("a photo of a cat.", "a photo of a armadillo.", blend_words=("cat.", "armadillo.")), tok, 30
    )
    lb = ctrl.local_blend
    assert lb.threshold == 0.3 and lb.start_step == 6
    assert lb.word_tokens[0].nonzero().flatten().tolist() == [5, 6]  # "cat" and "."
    assert lb.word_tokens[1].nonzero().flatten().tolist() == [5, 6, 7]  # "armad", "illo", "."
