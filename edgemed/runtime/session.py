"""What every runtime session is (ONNX Runtime, llama.cpp, TensorRT, and the PyTorch parent behind
the same calls) and the one generation loop they share.

A session implements the building blocks parity and the bench use (prompt_ids, pixel_values,
encode_image, logits) and three hooks of the loop below: `_image_input` (what its encoder takes),
`_prefill` and `_step`. Times count from the call, preprocessing and vision encoding included
(TTFT as MLPerf defines it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

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
                 messages: list[dict] | None = None, images: list | None = None) -> GenerationResult: ...


class GreedyGeneration:
    """generate() for a session with `eos` (a set of ids), a tokenizer whose decode takes
    skip_special_tokens, `prompt_ids`, `context_tokens` (the most positions it holds), and the
    three hooks."""

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

    def generate(self, image=None, prompt: str = "", max_new_tokens: int = 64, stop_at_eos: bool = True, *,
                 messages: list[dict] | None = None, images: list | None = None) -> GenerationResult:
        """Greedy decoding of the assistant's next turn.

        Either a conversation, `messages` (system prompt, history; content a string or typed parts
        with one {"type": "image"} per entry of `images`, in order), or the one-turn shortcut
        `generate(image, prompt)`. Times count from the call (preprocessing and vision encoding
        included). Decoding stops at an end-of-generation token (stop_at_eos), after
        max_new_tokens, or when the context is full, whichever comes first; finish_reason says which."""
        from edgemed.runtime.prompt import conversation

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise BadInputError("max_new_tokens", f"must be a positive integer, got {max_new_tokens!r}", "pass e.g. 64")
        messages, images = conversation(messages, images, prompt, image)
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
        nxt = int(np.argmax(logits))
        finish = "length"
        for _ in range(budget):
            out.append(nxt)
            times.append(time.perf_counter() - t0)
            if stop_at_eos and nxt in self.eos:
                finish = "stop"
                break
            if len(out) == budget:
                break
            nxt = int(np.argmax(self._step(nxt)))
        text_ids = [t for t in out if t not in self.eos]
        return GenerationResult(text=self.tokenizer.decode(text_ids, skip_special_tokens=True), token_ids=out,
                                prompt_tokens=len(ids), token_times_s=times, preprocess_s=pre_s,
                                vision_encode_s=vis_s, finish_reason=finish)
