"""What every runtime session is (ONNX Runtime, llama.cpp, TensorRT, and the PyTorch parent behind
the same calls) and the one generation loop they share.

A session implements the building blocks parity and the bench use (prompt_ids, pixel_values,
encode_image, logits) and three hooks of the loop below: `_image_input` (what its encoder takes),
`_prefill` and `_step`. Times count from the call, preprocessing and vision encoding included
(TTFT as MLPerf defines it).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import numpy as np

from edgemed.errors import BadInputError


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    # Seconds since the request started (preprocessing included), per output token.
    token_times_s: list[float] = field(default_factory=list)
    preprocess_s: float = 0.0
    vision_encode_s: float = 0.0
    # "stop": the model ended its answer (an end-of-generation token); "length": max_new_tokens or
    # the artifact's context ran out first (the text is what was generated until then).
    finish_reason: str = "stop"

    @property
    def ttft_ms(self) -> float | None:
        return self.token_times_s[0] * 1e3 if self.token_times_s else None

    @property
    def tpot_ms(self) -> float | None:
        t = self.token_times_s
        return (t[-1] - t[0]) / (len(t) - 1) * 1e3 if len(t) > 1 else None


class Session(Protocol):
    """The calls every session offers."""

    def prompt_ids(self, prompt: str, with_image: bool, grid: tuple[int, int] = (0, 0)) -> np.ndarray: ...

    def conversation_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                         grids: list[tuple[int, int]] | None = None) -> np.ndarray: ...

    def image_grid(self, image) -> tuple[int, int]: ...

    def pixel_values(self, image) -> np.ndarray: ...

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def logits(self, ids: np.ndarray, pixel_values: np.ndarray | None = None,
               decode_from: int | None = None) -> np.ndarray: ...

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop_at_eos: bool = True, *,
                 messages: list[dict] | None = None, images: list | None = None, **sampling) -> GenerationResult: ...

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop_at_eos: bool = True, *,
               messages: list[dict] | None = None, images: list | None = None, **sampling) -> Iterator["StreamChunk"]: ...


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (temperature 0, the default), or sampled from the
    softmax at `temperature`, cut to the `top_k` most likely tokens (0: all) and to the smallest set
    holding `top_p` of the probability; deterministic under `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        checks = [("temperature", self.temperature, lambda v: isinstance(v, (int, float)) and 0 <= v <= 100, "0 .. 100"),
                  ("top_p", self.top_p, lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]"),
                  ("top_k", self.top_k, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, ">= 0"),
                  ("seed", self.seed, lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "an integer")]
        for name, value, ok, want in checks:
            if not ok(value):
                raise BadInputError(name, f"must be {want}, got {value!r}", f"pass {name} {want}")

    def chooser(self):
        """pick(logits) -> token id, with its own random generator (one per request)."""
        if self.temperature == 0:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            x = np.asarray(logits, np.float64).reshape(-1) / self.temperature
            if 0 < self.top_k < x.size:
                x[x < np.partition(x, -self.top_k)[-self.top_k]] = -np.inf
            p = np.exp(x - x.max())
            p /= p.sum()
            if self.top_p < 1:
                order = np.argsort(-p, kind="stable")
                keep = np.cumsum(p[order]) - p[order] < self.top_p  # the smallest prefix reaching top_p
                cut = np.zeros_like(p)
                cut[order[keep]] = p[order[keep]]
                p = cut / cut.sum()
            return int(rng.choice(p.size, p=p))

        return pick


@dataclass
class StreamChunk:
    """One piece of a streamed answer: the new text and the tokens behind it; the last chunk has
    `result` (the whole GenerationResult: finish_reason, token counts, timings)."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None


class GreedyGeneration:
    """generate() and stream() for a session with `eos` (a set of ids), a tokenizer whose decode
    takes skip_special_tokens, `conversation_ids`, `image_grid`, `context_tokens` (the most
    positions it holds), and the three hooks. One generation at a time per session: concurrent
    calls from several threads wait for each other (the KV cache is the session's)."""

    eos: set[int]
    tokenizer: Any
    context_tokens: int

    def _image_input(self, image):
        """What the vision encoder takes for one image (timed as preprocessing)."""
        return self.pixel_values(image)

    def _encode(self, image_input):
        """Image features for the prompt's image tokens (timed as vision encoding)."""
        return self.encode_image(image_input)

    def _prefill(self, ids: np.ndarray, image_features, max_new_tokens: int) -> np.ndarray:
        """Run the prompt; keep the cache for _step; return the last position's logits."""
        raise NotImplementedError  # pragma: no cover

    def _step(self, token: int) -> np.ndarray:
        """Feed one token after the cache; return its logits."""
        raise NotImplementedError  # pragma: no cover

    def _generation_context(self):
        """A context every generation runs in (the PyTorch parent: inference mode)."""
        return contextlib.nullcontext()

    @property
    def _lock(self) -> threading.Lock:
        return self.__dict__.setdefault("_generation_lock", threading.Lock())  # setdefault is atomic

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop_at_eos: bool = True, *,
                 messages: list[dict] | None = None, images: list | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """The assistant's next turn.

        Either a conversation, `messages` (system prompt, history; content a string or typed parts
        with one {"type": "image"} per entry of `images`, in order), or the one-turn shortcut
        `generate(image, prompt)`. Greedy unless `temperature` > 0 (then top_k / top_p sampling,
        reproducible with `seed`). Decoding stops at an end-of-generation token (stop_at_eos), at a
        `stop` string (not included in the text), after max_new_tokens, when the context is full,
        or when `cancel` is set; finish_reason says which ("stop", "length", "cancelled"). Times
        count from the call (preprocessing and vision encoding included)."""
        result = None
        for chunk in self.stream(image, prompt, max_new_tokens, stop_at_eos, messages=messages, images=images,
                                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                 cancel=cancel):
            result = chunk.result or result
        return result

    def stream(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop_at_eos: bool = True, *,
               messages: list[dict] | None = None, images: list | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamChunk]:
        """generate(), yielding the text as it is decoded (StreamChunk; the last one holds the
        result). Closing the iterator stops decoding after the current token."""
        from edgemed.runtime.prompt import conversation

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise BadInputError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}", "pass e.g. 64")
        pick = Sampling(temperature, top_p, top_k, seed).chooser()
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise BadInputError("stop", f"must be non-empty strings, got {stop!r}", "pass e.g. stop=['\\n\\n']")
        messages, images = conversation(messages, images, prompt, image)
        with self._lock, self._generation_context():
            yield from self._generation_loop(messages, images, max_new_tokens, stop_at_eos, pick, stops, cancel)

    def _generation_loop(self, messages, images, max_new_tokens, stop_at_eos, pick, stops,
                         cancel) -> Iterator[StreamChunk]:
        t0 = time.perf_counter()
        feats = None
        pre_s = vis_s = 0.0
        if images:
            inputs = [self._image_input(im) for im in images]
            t1 = time.perf_counter()
            pre_s = t1 - t0
            encoded = [np.asarray(self._encode(x)) for x in inputs]
            feats = np.concatenate([e.reshape(-1, e.shape[-1]) for e in encoded]) if len(encoded) > 1 else encoded[0]
            vis_s = time.perf_counter() - t1
        ids = self.conversation_ids(messages, grids=[self.image_grid(im) for im in images])
        context = int(self.context_tokens)
        if len(ids) >= context:
            raise BadInputError("prompt", f"{len(ids)} tokens (image tokens included) leave no room in the "
                                f"artifact's context of {context} tokens", "shorten the prompt or the conversation")
        # Checked before any cache is allocated: the KV cache holds the prompt and this many tokens.
        budget = min(max_new_tokens, context - len(ids))
        logits = self._prefill(ids, feats, budget)
        out: list[int] = []
        times: list[float] = []
        text, sent, sent_tokens = "", 0, 0
        finish = "length"
        nxt = pick(logits)
        while True:
            out.append(nxt)
            times.append(time.perf_counter() - t0)
            if stop_at_eos and nxt in self.eos:
                finish = "stop"
                break
            text = self.tokenizer.decode([t for t in out if t not in self.eos], skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            # Hold back a partial character and whatever could still become a stop string.
            ready = len(text) - _held_back(text, stops)
            if ready > sent:
                yield StreamChunk(text[sent:ready], out[sent_tokens:])
                sent, sent_tokens = ready, len(out)
            if len(out) == budget:
                break
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            nxt = pick(self._step(nxt))
        result = GenerationResult(text=text, token_ids=out, prompt_tokens=len(ids), token_times_s=times,
                                  preprocess_s=pre_s, vision_encode_s=vis_s, finish_reason=finish)
        yield StreamChunk(text[sent:], out[sent_tokens:], result)


def logits_many(session, requests: list[tuple]) -> list[np.ndarray]:
    """session.logits(ids, pixel_values, decode_from) of each request; at once where the session
    batches passes (compress --low-memory's layered ONNX decoder: one pass over its layers)."""
    if getattr(session, "batches_passes", False):
        return session.logits_many(requests)
    return [session.logits(ids, pv, decode_from=d) for ids, pv, d in requests]


def greedy_answers(session, items: list[tuple], max_new_tokens: int, drafts: list | None = None) -> list[str]:
    """generate(image, prompt, max_new_tokens, stop_at_eos=True).text of each (image, prompt); at
    once where the session batches passes, checking `drafts` (token ids likely to be the answer:
    the parent's) many tokens a pass. The same answers either way."""
    if getattr(session, "batches_passes", False):
        return session.greedy_answers(items, max_new_tokens, drafts)
    return [session.generate(image, prompt, max_new_tokens=max_new_tokens, stop_at_eos=True).text
            for image, prompt in items]


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep unsent: a partial UTF-8 character (decoded as U+FFFD),
    or the longest tail that begins a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
