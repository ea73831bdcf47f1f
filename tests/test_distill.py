"""distill `data: parent`: sequence-level KD on answers the parent writes, the KLD-vs-steps curve on
held-out topics, and resuming an interrupted (or extended) distillation from its checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

TARGET = "cpu-x86-avx2"

RECIPE = """name: pw-kd
steps:
  - step: prune-width
    args: {{fraction: 0.5, calibration_count: 4}}
  - step: distill
    args: {{steps: {steps}, batch: 2, lr: 3.0e-4, data: parent, parent_samples: 6, parent_tokens: 16,
            eval_every: 2, eval_samples: 2, checkpoint_every: 2}}
"""


def test_prompt_sets_are_seeded_and_held_out_topics_never_train():
    from edgemed.calibration.builtin import DISTILL_HELDOUT_TOPICS
    from edgemed.transforms.kd_data import distill_prompts

    train = distill_prompts(2000, seed=0)
    assert train == distill_prompts(2000, seed=0) and train != distill_prompts(2000, seed=1)
    assert len(set(train)) > 400  # every task x topic pair, cycled
    assert not any(t in p for p in train for t in DISTILL_HELDOUT_TOPICS)
    held = distill_prompts(20, seed=0, heldout=True)
    assert all(any(t in p for t in DISTILL_HELDOUT_TOPICS) for p in held)


@pytest.mark.parametrize("family", ["llama", "llava-clip"])
def test_parent_answers_are_the_prompt_then_sampled_tokens_up_to_eos(family, tiny_dir):
    from edgemed.models import load_model
    from edgemed.transforms.kd_data import distill_prompts, generate

    cm = load_model(str(tiny_dir(family)))
    prompts = distill_prompts(5, seed=0)
    seqs = generate(cm, cm.model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=0, batch=2)
    again = generate(cm, cm.model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=0, batch=2)
    eos = set(cm.text.eos_token_ids)
    for p, s, s2 in zip(prompts, seqs, again):
        ids = cm.prompt_ids(p, False)
        assert np.array_equal(s[:len(ids)], ids)  # left padding stripped: the prompt as the chat renders it
        new = s[len(ids):].tolist()
        assert 1 <= len(new) <= 12 and not (eos & set(new[:-1]))  # nothing after the first EOS
        assert np.array_equal(s, s2)  # seeded sampling


def test_parent_data_distillation_draws_a_curve_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    import edgemed.transforms.kd_data as kd_data
    from edgemed.models.tiny import build_tiny
    from edgemed.pipeline import compress
    from edgemed.transforms.distill import Distill

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    model = build_tiny("llama", tmp_path / "m", num_hidden_layers=2, intermediate_size=256)
    calls = {"generate": 0, "loss": 0}
    real_generate, real_loss = kd_data.generate, Distill._kd_loss

    def counting_generate(*a, **kw):
        calls["generate"] += 1
        return real_generate(*a, **kw)

    def failing_loss(*a, **kw):
        calls["loss"] += 1
        if calls["loss"] == 5:  # step 3's first sample: step 2 is checkpointed
            raise RuntimeError("power cut")
        return real_loss(*a, **kw)

    monkeypatch.setattr(kd_data, "generate", counting_generate)
    monkeypatch.setattr(Distill, "_kd_loss", staticmethod(failing_loss))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(steps=6))
    with pytest.raises(Exception, match="power cut"):
        compress(str(model), [str(recipe), "q8_0"], TARGET, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert calls["generate"] == 2  # the training answers and the held-out ones, cached
    assert len(list((tmp_path / "home" / "distill").glob("*.pt"))) == 1

    # Re-run with more steps (a curve that has not flattened): same data, continues from step 2.
    monkeypatch.setattr(Distill, "_kd_loss", staticmethod(real_loss))
    recipe.write_text(RECIPE.format(steps=8))
    compress(str(model), [str(recipe), "q8_0"], TARGET, tmp_path / "a")
    assert calls["generate"] == 2
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert any(n.startswith("distill: resumed from step 2") for n in m["notes"])
    d = m["runtime"]["distill"]
    assert [c["step"] for c in d["curve"]] == [0, 2, 4, 6, 8]
    assert d["data"]["kind"] == "parent" and d["data"]["samples"] == 6 and d["data"]["heldout_sequences"] == 2
    assert d["curve"][0]["kld_mean"] > 0 and d["curve"][-1]["kld_mean"] < d["curve"][0]["kld_mean"]
    assert not list((tmp_path / "home" / "distill").glob("*.pt"))  # the checkpoint is gone when done


@pytest.mark.parametrize("data", ["calibration", "parent"])
def test_refit_before_distillation_starts_from_each_layers_least_squares_fit(tmp_path, monkeypatch, data):
    """distill refit=true: each pruned FFN's down projection is refit to the parent's FFN output before
    KD (distill_local.refit_ffns, in memory), which lowers each layer's error and the KLD KD starts from;
    with data: parent the fit's rows are the parent's answers that KD then trains on."""
    from edgemed.models.tiny import build_tiny
    from edgemed.pipeline import compress
    from edgemed.transforms import kd_data

    monkeypatch.setenv("EDGEMED_HOME", str(tmp_path / "home"))
    model = build_tiny("llama", tmp_path / "m", num_hidden_layers=2, intermediate_size=256)
    recipe = tmp_path / "r.yaml"
    parent = ", data: parent, parent_samples: 6, parent_tokens: 16" if data == "parent" else ""
    recipe.write_text("name: width-refit\nsteps:\n  - step: prune-width\n    args: {fraction: 0.25, calibration_count: 4}\n"
                      f"  - step: distill\n    args: {{steps: 2, batch: 1, calibration_count: 4, refit: true{parent}}}\n")
    answers = []
    generate = kd_data.generate
    monkeypatch.setattr(kd_data, "generate", lambda *a, **k: answers.extend(generate(*a, **k)) or answers)
    m = compress(str(model), [str(recipe), "q8_0"], TARGET, tmp_path / "a").manifest
    d = m.runtime["distill"]
    if data == "parent":
        assert len(answers) == 6
        assert d["refit"]["data"] == f"parent answers (6 sequences, {sum(len(s) for s in answers)} positions)"
    else:
        assert d["refit"]["data"] == "calibration" and not answers
    assert [f["layer"] for f in d["refit"]["layers"]] == [0, 1]
    assert all(f["heldout_error_after"] <= f["heldout_error_before"] for f in d["refit"]["layers"])
    assert all(0 <= f["relative_error_after"] <= f["relative_error_before"] for f in d["refit"]["layers"])
    assert d["refit"]["kld_vs_parent"]["kld_mean"] < d["kld_vs_parent_before"]["kld_mean"]


def test_refit_ridge_is_cross_validated_and_keeps_the_weights_it_cannot_check():
    """distill_local._fit on sums of known data: with more rows than channels in each fold, the fit
    finds the true weights (held-out error near 0); with rows from one calibration feed only there is
    no held-out fold, and the pruned weights are kept as they are."""
    import torch

    from edgemed.transforms.distill_local import _fit

    g = torch.Generator().manual_seed(0)
    w_true, w0 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    folds = [torch.randn(50, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    hh, hy = [h.T @ h for h in folds], [h.T @ (h @ w_true.T) for h in folds]
    yy = [float((h @ w_true.T).square().sum()) for h in folds]
    fit = _fit(hh, hy, yy, w0)
    assert fit["ridge"] == 0.01 and fit["heldout_error_after"] < 0.01 < fit["heldout_error_before"] == 1.0
    assert torch.allclose(fit["w"], w_true, atol=0.05)
    one = _fit([hh[0], 0], [hy[0], 0], [yy[0], 0], w0)
    assert one["ridge"] is None and one["w"] is w0 and one["heldout_error_after"] is None
    assert one["relative_error_before"] == one["relative_error_after"] == 1.0
