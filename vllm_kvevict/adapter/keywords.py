"""Keyword overlap with the prompt's tail: a question signal for middle prompt chunks at no cost.

The other way (``prefill_query="keywords"``) to give the middle chunks of an evicted prompt the
question's signal (``adapter/probe.py`` is the attention-based one): the tail's tokens are known
at admission, and a block that holds the tail's *rare* tokens (those few of the prompt's blocks
hold: the names and nouns a question repeats from the fact it asks about) is likely one the
question will attend to. It is the term-overlap scoring of sparse retrieval (BM25's inverse
document frequency, with a prompt's blocks as the documents), not attention: it finds the fact
a question names, not one it paraphrases.

Readings we had to choose:
- *Tail*: the policy's observation window (the question, and the chat template's tail).
- *Rare*: a tail token is counted where at most an eighth of the prompt's blocks before the
  tail hold it (at least one); weight ``log(blocks / blocks holding it)``, summed per block over
  the distinct tail tokens it holds.
- *Merge*: at a middle chunk's decision the block's attention score and its keyword score each
  count as a share of their total over the resident blocks, and the two shares are added: a
  block the tail names outranks one that only its chunk attended to, and among blocks it
  does not name the attention ranks.
"""

from __future__ import annotations

import math

import numpy as np

#: a tail token counts where at most this share of the prompt's blocks hold it
RARE_SHARE = 1 / 8
#: share of a block's keyword score the next block gets
FOLLOW = 0.5


def block_keywords(prompt: list[int], block_size: int, tail: int) -> np.ndarray | None:
    """``[nb]`` float32 per block position of the prompt before its last ``tail`` tokens: the
    summed weights of the tail's rare tokens the block holds; None when no block holds one."""
    body = np.asarray(prompt[: max(len(prompt) - tail, 0)], dtype=np.int64)
    nb = math.ceil(len(body) / block_size)
    if nb < 2 or tail < 1:
        return None
    wanted = np.unique(np.asarray(prompt[-tail:], dtype=np.int64))
    block_of = np.arange(len(body)) // block_size
    hit = np.isin(body, wanted)
    pairs = np.unique(np.stack([block_of[hit], body[hit]]), axis=1)  # (block, token) once each
    if not pairs.size:
        return None
    tokens, df = np.unique(pairs[1], return_counts=True)
    rare = df <= max(1, int(RARE_SHARE * nb))
    weight = dict(zip(tokens[rare].tolist(), np.log(nb / df[rare]).tolist()))
    scores = np.zeros(nb, dtype=np.float32)
    for block, token in pairs.T.tolist():
        scores[block] += weight.get(token, 0.0)
    if not scores.any():
        return None
    scores[1:] += FOLLOW * scores[:-1]  # the fact goes on past its name
    return scores


def with_keywords(scores: np.ndarray, positions: np.ndarray, keywords: np.ndarray) -> np.ndarray:
    """``[nb]`` attention scores at block ``positions`` plus the keyword shares: each as a share
    of its total over these blocks (blocks past the keywords' end get none)."""
    lex = np.where(positions < len(keywords),
                   keywords[np.minimum(positions, len(keywords) - 1)], 0.0)
    total = float(scores.sum())
    out = scores / total if total > 0 else scores.astype(np.float32)
    if lex.sum() > 0:
        out = out + lex / lex.sum()
    return out.astype(np.float32)
