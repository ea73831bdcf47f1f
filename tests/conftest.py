"""Shared fixtures: tiny random models of every family, built offline in seconds, and the ONNX
artifacts compressed from them once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from edgemed.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = build_tiny(family, root / family, seed=0)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def artifact(tiny_dir, tmp_path_factory):
    """compress(tiny family, recipe) once per session; returns the artifact folder."""
    from edgemed.pipeline import compress

    root = tmp_path_factory.mktemp("artifacts")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, recipe: str) -> Path:
        key = (family, recipe)
        if key not in cache:
            out = root / f"{family}-{recipe}"
            compress(str(tiny_dir(family)), [recipe], "cpu-x86-avx2", out)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def edgemed_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("edgemed_home")
    os.environ["EDGEMED_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def transformers_logits():
    """run(folder, image, question) -> (logits, input_ids, pixel_values): what transformers alone
    (Auto classes, the folder's own processor and chat template) computes for one image question."""
    def run(folder, image, question):
        import torch
        import transformers as tf

        model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = tf.AutoProcessor.from_pretrained(folder)
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].numpy()
        return logits, inputs["input_ids"][0].numpy(), inputs["pixel_values"].numpy()

    return run
