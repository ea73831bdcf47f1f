"""Scorers for medical VQA and multiple-choice suites, with intervals and subgroup gaps.

Published closed-question accuracies for VQA-RAD, SLAKE and PathVQA mostly come from LLaVA-Med's
``llava/eval/run_eval.py``, which matches substrings: "no" is found in "normal", "nodule" and
"not", and in the version the LLaVA-Med paper and its followers used, a prediction that says yes
or no but is wrong is dropped from the denominator. edgemed therefore reports a strict number
(:func:`strict_closed`) and the compatible one (:func:`llava_med_closed`) side by side, each with
its own n, and never mixes open-answer recall (LLaVA-Med) with tokenized F1 (MedGemma): the two
are not comparable.

Only numpy and the standard library are used, so this runs on the device next to the runtime.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from edgemed.errors import BadInputError

__all__ = [
    "YES_NO",
    "llava_med_normalize",
    "normalize_answer",
    "strict_closed",
    "llava_med_closed",
    "open_recall",
    "exact_match",
    "tokenized_f1",
    "extract_choice",
    "multiple_choice",
    "bootstrap_ci",
    "item_kind",
    "score_item",
    "summarize",
    "subgroups",
    "METRICS",
]

YES_NO = ("yes", "no")

# --------------------------------------------------------------------------------------------
# normalization

_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)

# LLaVA-Med's eval_metrics/glossary.py normalize_word (from the VQA v2 evaluation script).
_LLAVA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
_LLAVA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# Upstream's lookbehind is misspelled "(?!<=\d)", so every period not followed by a digit goes.
_LLAVA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_LLAVA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                       "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def llava_med_normalize(text: str) -> str:
    """LLaVA-Med's ``normalize_word``, reproduced for the compatible scorers.

    Quirks kept on purpose, because the published numbers depend on them: a punctuation mark next
    to a space is deleted everywhere (joining words) while otherwise it becomes a space; periods
    go (at most 32 of them: upstream passes ``re.UNICODE`` as the ``count`` argument); number
    words map to digits ("none" -> "0"); articles go. Not reproduced: its table rewriting
    apostrophe-less contractions ("dont" -> "don't"), which changes no yes/no decision and only
    recall on answers spelled that way.
    """
    original = text
    out = text
    for p in _LLAVA_PUNCT:
        if (p + " " in original or " " + p in original) or _LLAVA_COMMA_STRIP.search(original):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _LLAVA_PERIOD_STRIP.sub("", out, count=int(re.UNICODE))
    words = [_LLAVA_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalization for the strict scorers: lowercase, no punctuation, no articles."""
    words = str(text).lower().translate(_PUNCT_TABLE).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


# --------------------------------------------------------------------------------------------
# closed (yes/no) questions


def _label_regex(labels: Sequence[str]) -> re.Pattern:
    alts = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    return re.compile(rf"\b({alts})\b", re.IGNORECASE)


_YES_NO_RE = _label_regex(YES_NO)


def strict_closed(pred: str, answer: str, labels: Sequence[str] = YES_NO) -> bool:
    """The first label word (yes/no, whole word, any case) in the prediction is the gold label.

    "normal", "nodule" and "not" are not "no"; a prediction with no label word is wrong and stays
    in the denominator. For PubMedQA pass ``labels=("yes", "no", "maybe")``. A closed question
    whose gold answer is not a label (SLAKE's "CT or MRI?") is right when the normalized
    prediction is the gold answer or starts with it as whole words ("CT, axial view").
    """
    gold = normalize_answer(answer)
    label_set = {x.lower() for x in labels}
    if gold in label_set:
        rx = _YES_NO_RE if tuple(labels) == YES_NO else _label_regex(labels)
        m = rx.search(str(pred))
        return m is not None and m.group(1).lower() == gold
    p = normalize_answer(pred)
    return bool(gold) and (p == gold or p.startswith(gold + " "))


def llava_med_closed(pred: str, answer: str, variant: str = "original") -> bool | None:
    """LLaVA-Med's closed-question rule; None means the item leaves the denominator.

    Reproduces microsoft/LLaVA-Med ``llava/eval/run_eval.py``, ``evaluate()``, CLOSED branch. Both
    prediction and gold are lowercased and passed through :func:`llava_med_normalize`, then:

    ``variant="original"`` (commit e9972cf, the code behind the 2023 paper and the papers that
    copied it)::

        if 'yes' in pred or 'no' in pred:      # substrings: "normal", "not", "nodule" count
            if gold in pred: hit 1             # again a substring test
            # else: nothing appended -> a wrong yes/no answer drops out of the denominator
        else: hit 0                            # no yes/no substring at all: counted wrong

    so this returns True, None (said yes/no, wrong: dropped) or False (never said yes/no).

    ``variant="fixed"`` (commit b9a98a7, "fix closed accuracy calculation (#35)", Dec 2023, and
    ``run_eval_batch.py``): every item counts and a hit is ``gold in pred`` as a substring, so
    "no" still matches "normal". Returns True or False. Med-MoE's ``run_eval.py`` uses the same
    substring test without the word normalization.
    """
    gold = llava_med_normalize(str(answer).lower())
    p = llava_med_normalize(str(pred).lower())
    if variant == "fixed":
        return gold in p
    if variant != "original":
        raise BadInputError("variant", f"unknown LLaVA-Med scorer variant {variant!r}",
                            "use 'original' (run_eval.py as published) or 'fixed' (after PR #35)")
    if "yes" in p or "no" in p:
        return True if gold in p else None
    return False


# --------------------------------------------------------------------------------------------
# open questions


def open_recall(pred: str, answer: str) -> float:
    """LLaVA-Med's open-question recall: how much of the gold answer's words the prediction has.

    Reproduces ``calculate_f1score``'s recall in microsoft/LLaVA-Med
    ``llava/eval/eval_metrics/evaluate_metrics.py`` as run by ``run_eval.py`` (which normalizes
    both strings twice, done here too): words are whitespace tokens after
    :func:`llava_med_normalize`; ``tp`` counts each shared word as many times as the
    *prediction* repeats it and ``fn`` the gold words missing from the prediction, recall =
    tp / (tp + fn). With no repeated words this is the fraction of gold words present.
    """
    p = Counter(llava_med_normalize(llava_med_normalize(str(pred).lower())).split())
    g = Counter(llava_med_normalize(llava_med_normalize(str(answer).lower())).split())
    if not p or not g:
        return 0.0
    tp = sum(p[w] for w in p if w in g)
    fn = sum(g[w] for w in g if w not in p)
    return tp / (tp + fn) if tp else 0.0


def exact_match(pred: str, answer: str) -> bool:
    """Normalized prediction equals the normalized gold answer.

    Not LLaVA-Med's ``calculate_exactmatch``, which despite its name is a word-precision score.
    """
    return normalize_answer(pred) == normalize_answer(answer)


def tokenized_f1(pred: str, answer: str) -> float:
    """Token-overlap F1 (SQuAD style: bag of normalized words), the metric MedGemma reports.

    Not comparable with :func:`open_recall`: F1 punishes long answers, recall rewards them.
    """
    p, g = _tokens(pred), _tokens(answer)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# multiple choice


def extract_choice(pred: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer chose, or None when it cannot be told.

    Tried in order: an explicit "answer is B" / "Answer: (B)"; a bare letter ("B", "(B)", "B.");
    a leading "B." / "B)" / "B:"; a single parenthesized letter anywhere; finally the option
    text itself when exactly one option's text (the longest, when one contains another) appears.
    Lower-case letters are only trusted when bracketed or alone, since "a" is also an article.
    """
    if not options:
        raise BadInputError("options", "is empty", "pass the question's options, e.g. {'A': ..., 'B': ...}")
    letters = [str(k).upper() for k in options]
    cls = "".join(re.escape(x) for x in letters)
    text = str(pred).strip()
    patterns = (
        rf"\banswer\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?([{cls}])\b(?![\w'])",
        rf"^[\(\[]?([{cls}{cls.lower()}])[\)\]\.:]?$",
        rf"^[\(\[]?([{cls}])[\)\]\.:]\s",
        rf"^[\(\[]([{cls.lower()}])[\)\]]",
    )
    for i, pat in enumerate(patterns):
        m = re.search(pat, text, re.IGNORECASE if i == 0 else 0)
        if m:
            found = m.group(1).upper()
            if i == 0 and m.group(1).islower() and not re.search(rf"[\(\[]{m.group(1)}\b", m.group(0)):
                continue  # "the answer is a ..." is an article, not option a
            return found
    bracketed = set(re.findall(rf"\(([{cls}])\)", text))
    if len(bracketed) == 1:
        return bracketed.pop()
    p = f" {normalize_answer(text)} "
    by_letter = {str(k).upper(): normalize_answer(v) for k, v in options.items()}
    hits = sorted(((len(t), k) for k, t in by_letter.items() if t and f" {t} " in p), reverse=True)
    if not hits or (len(hits) > 1 and hits[1][0] == hits[0][0]):
        return None
    chosen = by_letter[hits[0][1]]
    # a shorter option named too is only harmless when it is part of the chosen option's text
    if any(f" {by_letter[k]} " not in f" {chosen} " for _, k in hits[1:]):
        return None
    return hits[0][1]


def multiple_choice(pred: str, options: Mapping[str, str], answer_idx: str) -> bool:
    """The extracted choice is the gold letter; an answer no option can be read from is wrong."""
    return extract_choice(pred, options) == str(answer_idx).strip().upper()


# --------------------------------------------------------------------------------------------
# intervals


_BOOTSTRAP_CHUNK_ELEMS = 4_000_000  # resample indices held at once (32 MB of int64)


def bootstrap_ci(values: Iterable[float], n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the mean; deterministic for a given seed.

    Resamples in chunks so a 6,700-item PathVQA run does not allocate a 1000 x n index matrix at
    once. An all-correct or all-wrong group gets a zero-width interval: with small n, read the n
    next to it. Returns (None, None) for no values.
    """
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if n_resamples < 1:
        raise BadInputError("n_resamples", f"must be >= 1, got {n_resamples}", "use 1000 or more")
    if not 0 < alpha < 1:
        raise BadInputError("alpha", f"must be in (0, 1), got {alpha}", "use 0.05 for a 95% interval")
    n = arr.size
    if n == 0:
        return None, None
    if np.isnan(arr).any():
        raise BadInputError("values", "contain NaN or None", "drop unscored items before the bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, min(n_resamples, _BOOTSTRAP_CHUNK_ELEMS // n))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = arr[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# suites

METRICS = ("closed_acc", "closed_acc_llava_med_compat", "open_recall", "open_exact", "open_f1", "mc_acc")
"""Per-item metrics :func:`score_item` fills; each is averaged over the items it applies to."""


def item_kind(item: Mapping) -> str:
    """"closed", "open" or "mc".

    ``answer_type`` (SLAKE's OPEN/CLOSED) wins; items with ``options`` are multiple choice; else,
    as for VQA-RAD and PathVQA, which carry no type, a yes/no gold answer makes a closed question.
    """
    at = item.get("answer_type")
    if at is not None:
        kind = str(at).strip().upper()
        if kind in ("CLOSED", "CLOSE"):
            return "closed"
        if kind == "OPEN":
            return "open"
        raise BadInputError("answer_type", f"unknown value {at!r}", "use 'OPEN' or 'CLOSED'")
    if item.get("options"):
        return "mc"
    return "closed" if normalize_answer(item["answer"]) in YES_NO else "open"


def score_item(item: Mapping, llava_med_variant: str = "original") -> dict[str, float | None]:
    """Every metric for one item: 1.0/0.0 or a fraction, None where it does not apply or drops out."""
    for k in ("pred", "answer"):
        if k not in item:
            raise BadInputError(f"item[{k!r}]", "is missing", "each item needs 'pred' and 'answer'")
    pred, answer = str(item["pred"]), str(item["answer"])
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    kind = item_kind(item)
    if kind == "closed":
        out["closed_acc"] = float(strict_closed(pred, answer))
        compat = llava_med_closed(pred, answer, llava_med_variant)
        out["closed_acc_llava_med_compat"] = None if compat is None else float(compat)
    elif kind == "open":
        out["open_recall"] = open_recall(pred, answer)
        out["open_exact"] = float(exact_match(pred, answer))
        out["open_f1"] = tokenized_f1(pred, answer)
    else:
        gold = item.get("answer_idx")
        if gold is None:
            raise BadInputError("item['answer_idx']", "is missing for a multiple-choice item",
                                "give the gold option letter, e.g. 'C'")
        out["mc_acc"] = float(multiple_choice(pred, item["options"], gold))
    return out


def _aggregate(values: list[float], n_resamples: int, seed: int) -> tuple[float | None, list | None]:
    if not values:
        return None, None
    lo, hi = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return float(np.mean(values)), [lo, hi]


def summarize(items: Iterable[Mapping], *, n_resamples: int = 1000, seed: int = 0,
              llava_med_variant: str = "original") -> dict:
    """One suite's ``accuracy`` block for report.json.

    Each metric is averaged over the items it applies to, with its own n in ``n_by_metric`` and
    its 95% bootstrap interval in ``ci95``; metrics with no items are None. The strict and the
    LLaVA-Med-compatible closed accuracies sit side by side; ``closed_dropped_llava_med_compat``
    counts the closed items the compatible scorer left out, and ``closed_no_label`` the closed
    predictions that never said yes or no.
    """
    items = list(items)
    scores = [score_item(it, llava_med_variant) for it in items]
    out: dict = {"n": len(items)}
    n_by: dict[str, int] = {}
    ci: dict[str, list | None] = {}
    for metric in METRICS:
        vals = [s[metric] for s in scores if s[metric] is not None]
        out[metric], ci[metric] = _aggregate(vals, n_resamples, seed)
        n_by[metric] = len(vals)
    closed = [it for it in items if item_kind(it) == "closed"]
    out["closed_dropped_llava_med_compat"] = n_by["closed_acc"] - n_by["closed_acc_llava_med_compat"]
    out["closed_no_label"] = sum(1 for it in closed if normalize_answer(it["answer"]) in YES_NO
                                 and not _YES_NO_RE.search(str(it["pred"])))
    out["n_by_metric"] = n_by
    out["ci95"] = ci
    out["llava_med_variant"] = llava_med_variant
    return out


def subgroups(items: Iterable[Mapping], key: str, metric: str = "closed_acc", *, min_n: int = 1,
              n_resamples: int = 1000, seed: int = 0, llava_med_variant: str = "original") -> dict:
    """One metric per value of ``item[key]`` (modality, organ, site...), with n and interval.

    Compression can widen gaps that the average hides, so the worst group and the best-worst gap
    are reported; only groups with at least ``min_n`` scored items compete for worst and best,
    since a 3-item group's accuracy is mostly noise. Items without ``key`` are counted in
    ``n_missing`` and otherwise ignored.
    """
    if metric not in METRICS:
        raise BadInputError("metric", f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    groups: dict[str, list[float]] = {}
    n_missing = 0
    for it in items:
        if it.get(key) is None:
            n_missing += 1
            continue
        v = score_item(it, llava_med_variant)[metric]
        if v is not None:
            groups.setdefault(str(it[key]), []).append(v)
    table = {}
    for g in sorted(groups):
        value, ci = _aggregate(groups[g], n_resamples, seed)
        table[g] = {"n": len(groups[g]), "value": value, "ci95": ci}
    ranked = [g for g in table if table[g]["n"] >= min_n]
    worst = min(ranked, key=lambda g: (table[g]["value"], g)) if ranked else None
    best = max(ranked, key=lambda g: (table[g]["value"], g)) if ranked else None
    gap = table[best]["value"] - table[worst]["value"] if ranked else None
    return {"key": key, "metric": metric, "min_n": min_n, "groups": table, "worst": worst,
            "best": best, "gap": gap, "n_missing": n_missing}
