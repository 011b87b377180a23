"""Token alignment between a source and an edited prompt, for Prompt-to-Prompt editing.

Cross-attention maps live per *token*, while users describe edits per *word*. These pure
functions translate between the two so the editor can (a) copy the source prompt's attention
maps onto the target prompt's tokens (Replacement and Refinement edits) and (b) scale the
attention of chosen words (Reweighting).

Conventions used throughout:

* A "word" is an item of ``prompt.split()`` (see :func:`words`); a word index indexes that list.
* Token positions are positions in the padded text-encoder input: position 0 is
  ``<|startoftext|>``, then the tokens of each word in order, then ``<|endoftext|>`` and padding up
  to ``max_len``. Each word is tokenised on its own; for the CLIP BPE tokenizer this gives the same
  ids as tokenising the whole prompt, because CLIP never merges tokens across whitespace.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import torch

from .errors import UserError
from .validate import reweight_pairs as _pairs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WordRef = Union[str, int]


def words(prompt: str) -> list[str]:
    """Split ``prompt`` on whitespace; these are the words that word indices refer to."""
    return prompt.split()


def _norm(word: str) -> str:
    """Case-fold and drop trailing punctuation so "Cat," and "cat" name the same word."""
    return word.lower().rstrip(string.punctuation)


def _word_tokens(prompt: str, tokenizer: PreTrainedTokenizerBase, max_len: int) -> list[list[int]]:
    """Token ids of each word of ``prompt``; refuses prompts that the encoder would truncate.

    Truncation would silently cut words (and move the end token), so every alignment below would
    be wrong; failing loudly is better.
    """
    per_word = [list(tokenizer.encode(w, add_special_tokens=False)) for w in words(prompt)]
    n_tokens = sum(len(t) for t in per_word) + 2
    if n_tokens > max_len:
        raise UserError(
            f"The prompt {prompt!r} is {n_tokens} tokens long but the text encoder takes at most "
            f"{max_len}; shorten the prompt."
        )
    return per_word


def _spans(per_word: list[list[int]]) -> list[range]:
    """Token positions of each word, counting the start token at position 0."""
    spans, pos = [], 1
    for toks in per_word:
        spans.append(range(pos, pos + len(toks)))
        pos += len(toks)
    return spans


def _resolve(prompt: str, word: WordRef, ws: list[str]) -> list[int]:
    """Word indices in ``ws`` that ``word`` (a string or an index) refers to."""
    if isinstance(word, bool) or not isinstance(word, (int, str)):
        raise UserError(f"Word {word!r} must be a string or an integer word index; pass one of {ws}.")
    if isinstance(word, int):
        if not 0 <= word < len(ws):
            raise UserError(
                f"Word index {word} is out of range for the prompt {prompt!r}, which has "
                f"{len(ws)} words {ws}; use an index from 0 to {len(ws) - 1}."
            )
        return [word]
    query = [_norm(w) for w in word.split()]
    if not query or not any(query):
        raise UserError(f"Word {word!r} is empty; name one of the prompt's words {ws}.")
    normed = [_norm(w) for w in ws]
    k = len(query)  # a multi-word string matches as a consecutive phrase
    hits = [i + o for i in range(len(ws) - k + 1) if normed[i : i + k] == query for o in range(k)]
    if not hits:
        raise UserError(
            f"The word {word!r} is not in the prompt {prompt!r}; use one of its words {ws} "
            "or a word index."
        )
    return hits


def word_token_indices(
    prompt: str, word: WordRef | Sequence[WordRef], tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Sorted token positions of every token of ``word`` in ``prompt``.

    ``word`` is a string (every occurrence, case-insensitive, trailing punctuation ignored; a
    string with spaces matches that consecutive phrase), an int index into :func:`words`, or a
    list of those. All BPE pieces of a word are returned, including those of attached punctuation
    ("tabby," -> the "tabby" and "," tokens), because the whole whitespace word is one unit.
    """
    ws = words(prompt)
    refs = [word] if isinstance(word, (str, int)) else list(word)
    if not refs:
        raise UserError(f"No word given; name at least one of the prompt's words {ws}.")
    spans = _spans(_word_tokens(prompt, tokenizer, tokenizer.model_max_length))
    idx = {w for ref in refs for w in _resolve(prompt, ref, ws)}
    return sorted(p for w in idx for p in spans[w])


def _shifted_tail(mapper: torch.Tensor, src_pos: int, tgt_pos: int, max_len: int) -> None:
    """Map the end token and padding position-for-position, offset so both end tokens line up.

    Source positions past ``max_len`` are dropped, so when the target is shorter the last target
    columns are left empty (sum 0): there is no source token to take them from.
    """
    for s, t in zip(range(src_pos, max_len), range(tgt_pos, max_len)):
        mapper[s, t] = 1.0


def replacement_mapper(
    source: str, target: str, tokenizer: PreTrainedTokenizerBase, max_len: int = 77
) -> torch.Tensor:
    """Matrix ``M`` (``max_len`` x ``max_len``) with ``target_map[j] = sum_i source_map[i] * M[i, j]``.

    Replacement swaps words one-for-one, so the prompts must have equal word counts. As in
    Prompt-to-Prompt's ``get_replacement_mapper``:

    * a word whose source and target token counts are equal maps token for token (this covers
      unchanged words, "Cat" -> "cat", and multi-token or punctuated swaps such as "cat," -> "dog,"
      whose punctuation token then maps onto the punctuation token);
    * a word whose token count changes spreads each of its ``n_s`` source tokens evenly over the
      ``n_t`` target tokens (weight ``1 / n_t``), so every source row still sums to 1 and the mapped
      softmax maps keep summing to 1 over the keys.

    The end token and the padding follow, shifted by the total change of token count so that both
    end tokens line up. (The original maps everything after the last replaced word with no shift,
    ``mapper[j, j]``, which misaligns the end token whenever the token count changed; see
    docs/method.md.)
    """
    src_words, tgt_words = _word_tokens(source, tokenizer, max_len), _word_tokens(target, tokenizer, max_len)
    if len(src_words) != len(tgt_words):
        raise UserError(
            f"Replacement needs equal word counts, but {source!r} has {len(src_words)} words and "
            f"{target!r} has {len(tgt_words)}; use a Refinement edit to add or remove words."
        )
    mapper = torch.zeros(max_len, max_len)
    mapper[0, 0] = 1.0
    for s_span, t_span in zip(_spans(src_words), _spans(tgt_words)):
        if len(s_span) == len(t_span):
            for s, t in zip(s_span, t_span):
                mapper[s, t] = 1.0
        elif s_span and t_span:
            mapper[s_span.start : s_span.stop, t_span.start : t_span.stop] = 1.0 / len(t_span)
    src_end = 1 + sum(map(len, src_words))
    tgt_end = 1 + sum(map(len, tgt_words))
    _shifted_tail(mapper, src_end, tgt_end, max_len)
    return mapper


def _align(src: list[int], tgt: list[int]) -> list[int]:
    """Needleman-Wunsch (match +1, mismatch -1, gap 0): for each target token, its source index or -1.

    With gap 0 a mismatch (-1) always loses to two gaps (0), so only equal tokens are ever paired.
    Ties are broken as Prompt-to-Prompt's ``global_align`` does, tracing back from the ends: first
    treat the target token as inserted, then the source token as deleted, and pair equal tokens
    only when that scores strictly better. Hence a repeated token pairs with the *earliest* equal
    copy it can ("a cat" -> "a a cat": the first "a" is kept, the second is new).
    """
    n, m = len(src), len(tgt)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    pairs, i, j = [-1] * m, n, m
    while j > 0:
        if i == 0 or score[i][j] == score[i][j - 1]:
            j -= 1  # target token j has no source counterpart
        elif score[i][j] == score[i - 1][j]:
            i -= 1  # source token i was removed
        else:  # strictly better than both gaps: necessarily a match
            i, j = i - 1, j - 1
            pairs[j] = i
    return pairs


def refinement_mapper(
    source: str, target: str, tokenizer: PreTrainedTokenizerBase, max_len: int = 77
) -> tuple[torch.Tensor, torch.Tensor]:
    """For Refinement (words added/removed): ``(mapper, alphas)``, both of length ``max_len``.

    The token sequences (start and end tokens, no padding) are globally aligned (see
    :func:`_align`). Target token ``j`` paired with an equal source token gets
    ``mapper[j]`` = that source position and ``alphas[j] = 1`` (reuse the source map). An inserted
    target token gets ``alphas[j] = 0`` so it keeps its own map; its ``mapper[j]`` is only a valid
    placeholder (the source position of the nearest paired token before it; the original stores -1,
    which indexes the last key: both are multiplied by alpha 0). Positions after the target's end
    token map to the same position of the source (no shift), with alpha 1, as in Prompt-to-Prompt's
    ``get_mapper``.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    src = [bos, *(t for w in _word_tokens(source, tokenizer, max_len) for t in w), eos]
    tgt = [bos, *(t for w in _word_tokens(target, tokenizer, max_len) for t in w), eos]
    mapper = torch.arange(max_len, dtype=torch.long)
    alphas = torch.ones(max_len)
    prev = 0
    for j, i in enumerate(_align(src, tgt)):
        if i >= 0:
            prev = i
        else:
            alphas[j] = 0.0
        mapper[j] = prev
    return mapper, alphas


def reweight_vector(
    prompt: str, words_and_factors: object, tokenizer: PreTrainedTokenizerBase, max_len: int = 77
) -> torch.Tensor:
    """Per-token attention scale for ``prompt``: 1 everywhere, times each factor on its word's tokens.

    Accepts the authors' CSV ``eq_params`` form ``{"words": [...], "values": [...]}``, a
    ``{word: factor}`` dict, or a ``(words, factors)`` pair. A token named twice takes the factor
    given last (assigned, not multiplied), as Prompt-to-Prompt's ``get_equalizer`` does.
    """
    _word_tokens(prompt, tokenizer, max_len)  # same length check as the mappers
    vec = torch.ones(max_len)
    for w, f in _pairs(words_and_factors):
        vec[word_token_indices(prompt, w, tokenizer)] = f
    return vec
