"""The runtime API clinic apps use (one loop for the ONNX, GGUF, TensorRT and parent sessions):
greedy or seeded sampling, streaming, stop strings, cancellation, and one generation at a time per
session across threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

QUESTION = "Is there a pleural effusion?"
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def session(artifact):
    from edgemed.runtime import load

    return load(artifact("llama", "int8"))


@pytest.fixture(scope="module", params=["int8", "q8_0"])
def any_session(artifact, request):
    """ONNX Runtime and llama.cpp sessions (their own prefill/step hooks under the one loop)."""
    from edgemed.runtime import load

    return load(artifact("llama", request.param))


def test_stream_pieces_make_the_generated_text(any_session):
    session = any_session
    ref = session.generate(messages=MESSAGES, max_new_tokens=12, stop_at_eos=False)
    chunks = list(session.stream(messages=MESSAGES, max_new_tokens=12, stop_at_eos=False))
    assert "".join(c.text for c in chunks) == ref.text
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert chunks[-1].result is not None and all(c.result is None for c in chunks[:-1])
    assert chunks[-1].result.finish_reason == "length" and len(ref.token_ids) == 12


def test_sampling_is_reproducible_under_a_seed_and_top_k_1_is_greedy(any_session):
    session = any_session
    greedy = session.generate(messages=MESSAGES, max_new_tokens=10, stop_at_eos=False)
    a = session.generate(messages=MESSAGES, max_new_tokens=10, stop_at_eos=False, temperature=1.5, seed=3)
    b = session.generate(messages=MESSAGES, max_new_tokens=10, stop_at_eos=False, temperature=1.5, seed=3)
    assert a.token_ids == b.token_ids
    others = {tuple(session.generate(messages=MESSAGES, max_new_tokens=10, stop_at_eos=False, temperature=1.5,
                                     seed=s).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters
    k1 = session.generate(messages=MESSAGES, max_new_tokens=10, stop_at_eos=False, temperature=0.7, top_k=1, seed=9)
    assert k1.token_ids == greedy.token_ids


def test_top_p_keeps_the_smallest_set_reaching_p():
    from edgemed.runtime.session import Sampling

    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
    pick = Sampling(temperature=1.0, top_p=0.7, seed=0).chooser()
    assert {pick(logits) for _ in range(300)} == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    pick = Sampling(temperature=1.0, top_k=3, seed=0).chooser()
    assert {pick(logits) for _ in range(500)} == {0, 1, 2}


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                                      ({"top_k": -2}, "top_k"), ({"seed": "x"}, "seed"), ({"stop": [""]}, "stop")])
def test_bad_sampling_arguments_are_named(session, kw, match):
    from edgemed.errors import BadInputError

    with pytest.raises(BadInputError, match=match):
        session.generate(messages=MESSAGES, max_new_tokens=2, **kw)


def test_a_stop_string_ends_the_answer_before_it(session):
    ref = session.generate(messages=MESSAGES, max_new_tokens=16, stop_at_eos=False)
    text = ref.text
    assert len(text) > 6
    stop = text[3:6]
    out = session.generate(messages=MESSAGES, max_new_tokens=16, stop_at_eos=False, stop=[stop, "never seen"])
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
    streamed = "".join(c.text for c in session.stream(messages=MESSAGES, max_new_tokens=16, stop_at_eos=False, stop=stop))
    assert streamed == out.text  # nothing of the stop string was sent first


def test_cancel_stops_between_tokens(session):
    cancel = threading.Event()
    seen = []
    for chunk in session.stream(messages=MESSAGES, max_new_tokens=50, stop_at_eos=False, cancel=cancel):
        seen.append(chunk)
        cancel.set()
    result = seen[-1].result
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 50


def test_threads_share_one_session_one_request_at_a_time(session):
    """Four threads on one session: each gets exactly what it gets alone (the KV cache is never shared)."""
    prompts = [QUESTION, "Describe the heart.", "Any fracture?", "Is the study normal?"]
    alone = [session.generate(messages=[{"role": "user", "content": p}], max_new_tokens=8, stop_at_eos=False).token_ids
             for p in prompts]
    got: dict[int, list[int]] = {}

    def run(i):
        got[i] = session.generate(messages=[{"role": "user", "content": prompts[i]}], max_new_tokens=8,
                                  stop_at_eos=False).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == alone
