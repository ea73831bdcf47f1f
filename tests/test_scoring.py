"""Medical VQA scorers: the LLaVA-Med substring traps, strict scoring, intervals, subgroups."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgemed.bench import scoring
from edgemed.bench.scoring import (
    bootstrap_ci,
    exact_match,
    extract_choice,
    item_kind,
    llava_med_closed,
    llava_med_normalize,
    multiple_choice,
    open_recall,
    strict_closed,
    subgroups,
    summarize,
    tokenized_f1,
)
from edgemed.errors import BadInputError

# ------------------------------------------------------------------------------------ closed


@pytest.mark.parametrize("pred, gold, expected", [
    ("Yes", "yes", True),
    ("yes.", "Yes", True),
    ("No, there is no fracture.", "no", True),
    ("YES, a small effusion is present; no fracture.", "yes", True),  # first label word wins
    ("No. Yes, on second look.", "yes", False),
    ("The lungs appear normal.", "no", False),  # "normal" is not "no"
    ("A nodule is seen.", "no", False),
    ("It is not enlarged.", "no", False),
    ("I cannot tell.", "yes", False),  # no label word: wrong, still counted
    ("yesterday's film", "yes", False),
])
def test_strict_closed(pred, gold, expected):
    assert strict_closed(pred, gold) is expected


def test_strict_closed_other_labels_and_non_label_gold():
    assert strict_closed("Maybe; the evidence is mixed.", "maybe", labels=("yes", "no", "maybe"))
    assert not strict_closed("Yes, maybe.", "maybe", labels=("yes", "no", "maybe"))
    assert strict_closed("CT", "CT")  # SLAKE closed question "CT or MRI?"
    assert strict_closed("CT, axial view.", "ct")
    assert not strict_closed("MRI, not CT", "CT")


def test_normal_counts_as_no_only_in_compatible_scorer():
    pred, gold = "The lungs appear normal.", "no"
    assert strict_closed(pred, gold) is False
    assert llava_med_closed(pred, gold) is True  # "no" is a substring of "normal"
    assert llava_med_closed(pred, gold, variant="fixed") is True
    assert llava_med_closed("A nodule is seen in the left lobe.", "no") is True


def test_compatible_scorer_denominator_follows_run_eval_py():
    # run_eval.py (original): said yes/no but wrong -> no hit appended: drops out
    assert llava_med_closed("Yes, there is a fracture.", "no") is None
    assert llava_med_closed("The heart is abnormal.", "yes") is None  # "no" inside "abnormal"
    # never said yes or no (as a substring) -> counted as wrong, stays in the denominator
    assert llava_med_closed("There is a mass in the left lobe.", "yes") is False
    assert llava_med_closed("Pleural effusion.", "no") is False
    assert llava_med_closed("I cannot say.", "yes") is None  # "no" inside "cannot"
    # after LLaVA-Med PR #35 every item counts
    assert llava_med_closed("Yes, there is a fracture.", "no", variant="fixed") is False
    with pytest.raises(BadInputError):
        llava_med_closed("yes", "yes", variant="2024")


def test_llava_med_normalize_quirks():
    assert llava_med_normalize("Yes, it is.") == "yes it is"
    assert llava_med_normalize("The answer is two") == "answer is 2"
    assert llava_med_normalize("left-sided") == "left sided"
    assert llava_med_normalize("a 2.5 cm mass") == "2.5 cm mass"


# ------------------------------------------------------------------------------------ open


def test_open_recall_matches_llava_med():
    assert open_recall("The left lung is affected.", "left lung") == 1.0
    assert open_recall("right lung", "Left lung") == 0.5
    assert open_recall("two lesions", "2") == 1.0  # number words normalized
    assert open_recall("", "liver") == 0.0
    assert open_recall("liver liver", "left liver") == pytest.approx(2 / 3)  # upstream counts pred repeats


def test_exact_match_and_tokenized_f1():
    assert exact_match("The Liver.", "liver")
    assert not exact_match("liver and spleen", "liver")
    assert tokenized_f1("liver and spleen", "liver") == pytest.approx(0.5)
    assert tokenized_f1("liver", "liver") == 1.0
    assert tokenized_f1("kidney", "liver") == 0.0
    # F1 punishes the long answer that recall rewards: not comparable
    long = "the liver, spleen, kidneys and pancreas are visible"
    assert open_recall(long, "liver") == 1.0 and tokenized_f1(long, "liver") < 0.4


# ------------------------------------------------------------------------------------ multiple choice

OPTIONS = {"A": "Amoxicillin", "B": "Penicillin G", "C": "Penicillin", "D": "Doxycycline"}


@pytest.mark.parametrize("pred, expected", [
    ("B", "B"),
    ("(b)", "B"),
    ("The answer is C.", "C"),
    ("Answer: (D)", "D"),
    ("C. Penicillin, because it covers the organism.", "C"),
    ("the answer is a course of doxycycline", "D"),  # "a" is an article here
    ("I would give penicillin G.", "B"),  # longest option text wins over the one inside it
    ("amoxicillin or doxycycline", None),  # two options named: ambiguous
    ("I am not sure.", None),
])
def test_extract_choice(pred, expected):
    assert extract_choice(pred, OPTIONS) == expected


def test_multiple_choice():
    assert multiple_choice("The answer is B", OPTIONS, "B")
    assert not multiple_choice("unsure", OPTIONS, "B")
    with pytest.raises(BadInputError):
        extract_choice("A", {})


# ------------------------------------------------------------------------------------ intervals


def test_bootstrap_ci_brackets_and_is_deterministic():
    values = [1] * 70 + [0] * 30
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo < 0.7 < hi
    assert 0.55 < lo and hi < 0.85
    assert bootstrap_ci(values, seed=0) == (lo, hi)
    assert bootstrap_ci(values, seed=1) != (lo, hi)
    assert bootstrap_ci([]) == (None, None)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    with pytest.raises(BadInputError):
        bootstrap_ci([1, 0], alpha=1.5)
    with pytest.raises(BadInputError):
        bootstrap_ci([1.0, float("nan")])


def test_bootstrap_ci_chunking_does_not_change_result(monkeypatch):
    values = [i % 3 / 2 for i in range(50)]
    whole = bootstrap_ci(values, n_resamples=200, seed=3)
    monkeypatch.setattr(scoring, "_BOOTSTRAP_CHUNK_ELEMS", 50 * 7)  # 7 resamples per chunk
    assert bootstrap_ci(values, n_resamples=200, seed=3) == pytest.approx(whole)
    assert whole[0] <= sum(values) / len(values) <= whole[1]


# ------------------------------------------------------------------------------------ suites


def vqa_items():
    return [
        {"pred": "Yes", "answer": "yes", "modality": "CT"},
        {"pred": "No.", "answer": "no", "modality": "CT"},
        {"pred": "The study is normal.", "answer": "no", "modality": "MRI"},  # strict wrong, compat right
        {"pred": "Yes, there is a mass.", "answer": "no", "modality": "MRI"},  # compat drops
        {"pred": "Unclear from this image.", "answer": "yes", "modality": "X-Ray"},  # both: wrong
        {"pred": "left lung", "answer": "left lung", "modality": "X-Ray"},
        {"pred": "The right kidney", "answer": "left kidney", "modality": "CT"},
        {"pred": "liver", "answer": "spleen", "answer_type": "OPEN"},
    ]


def test_item_kind():
    assert item_kind({"pred": "", "answer": "Yes"}) == "closed"  # VQA-RAD: no type field
    assert item_kind({"pred": "", "answer": "CT", "answer_type": "CLOSED"}) == "closed"
    assert item_kind({"pred": "", "answer": "yes", "answer_type": "OPEN"}) == "open"
    assert item_kind({"pred": "", "answer": "x", "options": OPTIONS, "answer_idx": "A"}) == "mc"
    with pytest.raises(BadInputError):
        item_kind({"pred": "", "answer": "x", "answer_type": "free"})


def test_summarize_reports_strict_and_compatible_side_by_side():
    s = summarize(vqa_items(), n_resamples=200)
    assert s["n"] == 8
    n = s["n_by_metric"]
    assert n["closed_acc"] == 5 and n["closed_acc_llava_med_compat"] == 4
    assert s["closed_acc"] == pytest.approx(2 / 5)
    assert s["closed_acc_llava_med_compat"] == pytest.approx(3 / 4)  # inflated
    assert s["closed_dropped_llava_med_compat"] == 1
    assert s["closed_no_label"] == 2  # "normal" and "unclear" never say yes or no
    assert n["open_recall"] == 3
    assert s["open_recall"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert s["open_exact"] == pytest.approx(1 / 3)
    assert s["mc_acc"] is None and s["ci95"]["mc_acc"] is None and n["mc_acc"] == 0
    for metric in ("closed_acc", "closed_acc_llava_med_compat", "open_recall", "open_exact", "open_f1"):
        lo, hi = s["ci95"][metric]
        assert lo <= s[metric] <= hi
    assert summarize(vqa_items(), n_resamples=200) == s  # deterministic
    fixed = summarize(vqa_items(), n_resamples=200, llava_med_variant="fixed")
    assert fixed["n_by_metric"]["closed_acc_llava_med_compat"] == 5


def test_summarize_multiple_choice_and_bad_items():
    items = [{"pred": "B", "answer": "Penicillin G", "options": OPTIONS, "answer_idx": "B"},
             {"pred": "A", "answer": "Penicillin G", "options": OPTIONS, "answer_idx": "B"}]
    s = summarize(items, n_resamples=100)
    assert s["mc_acc"] == 0.5 and s["n_by_metric"]["mc_acc"] == 2
    with pytest.raises(BadInputError):
        summarize([{"answer": "yes"}])
    with pytest.raises(BadInputError):
        summarize([{"pred": "A", "answer": "x", "options": OPTIONS}])


def test_subgroups_worst_best_gap():
    g = subgroups(vqa_items(), "modality", "closed_acc", n_resamples=200)
    groups = g["groups"]
    assert groups["CT"] == {"n": 2, "value": 1.0, "ci95": [1.0, 1.0]}
    assert groups["MRI"]["n"] == 2 and groups["MRI"]["value"] == 0.0
    assert groups["X-Ray"]["n"] == 1
    assert g["best"] == "CT"
    assert g["worst"] in ("MRI", "X-Ray")
    assert g["gap"] == pytest.approx(1.0)
    assert g["n_missing"] == 1  # the OPEN item has no modality
    only_big = subgroups(vqa_items(), "modality", "closed_acc", min_n=2, n_resamples=200)
    assert only_big["worst"] == "MRI" and "X-Ray" in only_big["groups"]
    open_g = subgroups(vqa_items(), "modality", "open_recall", n_resamples=200)
    assert set(open_g["groups"]) == {"X-Ray", "CT"}
    with pytest.raises(BadInputError):
        subgroups(vqa_items(), "modality", "bleu")


def test_module_is_torch_free():
    assert "torch" not in Path(scoring.__file__).read_text()
