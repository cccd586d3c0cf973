"""Pure scoring math: no model, no processor. Log-probabilities and divergences in fp32.

- :func:`continuation_logprob`, :func:`next_token_logprobs`: log-likelihood of option tokens;
- :func:`normalize_answer`, :func:`vqa_accuracy`: open answers;
- :func:`reference_distribution`, :func:`kl_to_reference`, :func:`top1_agreement`: text fidelity.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import torch

SCORE_DTYPE = torch.float32  # log-softmax and KL are computed in fp32 whatever the model dtype
VQA_MIN_ANSWERS = 3  # from this many references on they are annotator answers (VQA accuracy), below: alternatives
VQA_MATCHES_FOR_FULL_CREDIT = 3

# -- multiple choice -------------------------------------------------------------------------------


def continuation_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t in [start, T): the log-likelihood of a continuation.

    logits: (T, V) the model's logits for the sequence ``ids`` (T,), logits[t] predicting ids[t + 1].
    start: index of the first continuation token, >= 1.
    """
    if not 1 <= start < ids.shape[0]:
        raise ValueError(f"continuation start must be in [1, {ids.shape[0]}), got {start}")
    return targets_logprob(logits[start - 1:-1], ids[start:])


def targets_logprob(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over t of log softmax(logits[t])[targets[t]]; logits (L, V), targets (L,)."""
    log_probs = torch.log_softmax(logits.to(SCORE_DTYPE), dim=-1)
    return float(log_probs.gather(-1, targets.to(log_probs.device)[:, None]).sum())


def next_token_logprobs(logits: torch.Tensor, token_ids: list[int]) -> list[float]:
    """log p(token) for each of ``token_ids`` from one position's logits (V,): the single-token options."""
    log_probs = torch.log_softmax(logits.to(SCORE_DTYPE), dim=-1)
    return [float(log_probs[t]) for t in token_ids]


def argmax(scores: list[float]) -> int:
    """Index of the highest score; the first one on ties (so the order of options decides, reproducibly)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# -- open answers ----------------------------------------------------------------------------------

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # 1,000 -> 1000
_NON_DECIMAL_POINT = re.compile(r"(?<!\d)\.|\.(?!\d)")  # keeps 3.5, drops a final '.'
_OTHER_PUNCT = re.compile("[" + re.escape(string.punctuation.replace(".", "").replace("'", "")) + "]")


def normalize_answer(text: str) -> str:
    """VQA-style normalisation for exact match.

    Lowercase; drop commas inside numbers and apostrophes ("dog's" -> "dogs"); a '.' survives only
    between digits (decimals); every other punctuation mark becomes a space; number words
    zero..twenty become digits; the articles a/an/the are dropped; whitespace is collapsed.

    >>> normalize_answer("Two.")
    '2'
    >>> normalize_answer("the cat")
    'cat'

    Args:
        text: an answer.

    Returns:
        The normalised answer.
    """
    text = _DIGIT_COMMA.sub("", text.lower()).replace("'", "")
    text = _OTHER_PUNCT.sub(" ", _NON_DECIMAL_POINT.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str] | tuple[str, ...]) -> float:
    """Score in [0, 1] of a generated answer against the references, after :func:`normalize_answer`.

    With at least ``VQA_MIN_ANSWERS`` (3) references they are taken as annotator answers (as VQAv2's
    ten) and the score is min(1, matches / 3); with one or two they are alternatives ("7", "seven")
    and the score is 1 when the prediction matches any of them, else 0.

    Args:
        prediction: the generated answer.
        answers: the reference answers.

    Returns:
        The score in [0, 1].
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer, got none")
    guess = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == guess for a in answers)
    if len(answers) >= VQA_MIN_ANSWERS:
        return min(1.0, matches / VQA_MATCHES_FOR_FULL_CREDIT)
    return float(matches > 0)


# -- text fidelity ---------------------------------------------------------------------------------


@dataclass
class ReferenceDistribution:
    """The dense model's next-token distributions over the T positions of one text (on CPU).

    log_probs: (T, K) log-probabilities; K = V (full vocabulary, ``index`` None) or top-k.
    index: (T, K) vocabulary ids of the top-k entries, or None for the full vocabulary.
    log_rest: (T,) log of the probability mass outside the top-k (-inf when K = V).
    top1: (T,) the dense model's argmax token per position.
    """

    log_probs: torch.Tensor
    index: torch.Tensor | None
    log_rest: torch.Tensor
    top1: torch.Tensor

    def __post_init__(self) -> None:
        if self.log_probs.dim() != 2 or self.log_rest.shape != self.log_probs.shape[:1]:
            raise ValueError(f"log_probs must be (T, K) and log_rest (T,), got {tuple(self.log_probs.shape)} "
                             f"and {tuple(self.log_rest.shape)}")
        if self.index is not None and self.index.shape != self.log_probs.shape:
            raise ValueError(f"index must match log_probs {tuple(self.log_probs.shape)}, got {tuple(self.index.shape)}")


def reference_distribution(logits: torch.Tensor, top_k: int | None = None) -> ReferenceDistribution:
    """Keep the dense model's distributions from its logits (T, V): all of it, or the top-k plus the rest mass."""
    log_probs = torch.log_softmax(logits.to(SCORE_DTYPE), dim=-1)  # (T, V)
    top1 = log_probs.argmax(-1)
    if top_k is None or top_k >= log_probs.shape[-1]:
        rest = torch.full(log_probs.shape[:1], float("-inf"))
        return ReferenceDistribution(log_probs.cpu(), None, rest, top1.cpu())
    top, index = log_probs.topk(top_k, dim=-1)  # (T, k)
    rest = _log_mass_outside(log_probs, index)
    return ReferenceDistribution(top.cpu(), index.cpu(), rest.cpu(), top1.cpu())


def _log_mass_outside(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log sum_{v not in index[t]} p[t, v] for each row t: (T, V), (T, k) -> (T,)."""
    return log_probs.scatter(-1, index, float("-inf")).logsumexp(-1)


def kl_to_reference(reference: ReferenceDistribution, logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || model) per position, (T,), from the model's logits (T, V).

    With a top-k reference this is the KL between the two distributions coarse-grained to the
    dense top-k tokens plus one "rest" bucket: exact when K = V, otherwise a lower bound of the
    full KL (usually close: the rest mass is small).
    """
    log_q = torch.log_softmax(logits.to(SCORE_DTYPE), dim=-1).cpu()  # (T, V)
    log_p = reference.log_probs
    if log_q.shape[0] != log_p.shape[0]:
        raise ValueError(f"reference has {log_p.shape[0]} positions, the model's logits {log_q.shape[0]}")
    if reference.index is None:
        return _kl_terms(log_p, log_q).sum(-1)
    head = _kl_terms(log_p, log_q.gather(-1, reference.index)).sum(-1)
    tail = _kl_terms(reference.log_rest, _log_mass_outside(log_q, reference.index))
    return head + tail


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) elementwise, 0 where p = 0 (so -inf - -inf never yields nan)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p > float("-inf"), terms, torch.zeros_like(terms))


def top1_agreement(reference: ReferenceDistribution, logits: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the model's argmax equals the dense model's, per position, from logits (T, V)."""
    return logits.argmax(-1).cpu() == reference.top1
