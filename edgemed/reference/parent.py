"""The PyTorch parent behind the same session API as an artifact (generate, prompt_ids,
pixel_values, encode_image, logits), so the benchmark measures it with the same loop.

The only bench module that runs torch, and only when a :class:`ParentSession` is used: at
compress time (the cached parent reference) and in ``bench/compare.py``. torch is imported
inside the methods, so importing this module (or ``edgemed.bench``) stays torch-free.

Prompts and pixels come from edgemed's own runtime code (``CompositeModel.build_prompt`` and
``edgemed.runtime.preprocess``), the inputs parity checks the artifact against, so the parent
and the artifact see the same token ids and the same pixels. Image features come from the
parent's vision tower and are scattered into the parent's embeddings (the decomposition parity
verifies); decoding uses the parent's own KV cache.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgemed.calibration.builtin import PARITY_PROMPTS, synthetic_test_image
from edgemed.runtime.session import GreedyGeneration


class ParentSession(GreedyGeneration):
    format = "pytorch"
    is_reference = True  # what artifacts are judged against: the bench reports no fidelity for it

    def __init__(self, cm, num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cm = cm
        self.eos = set(cm.text.eos_token_ids or [])
        self.tokenizer = cm.tokenizer
        self.context_tokens = cm.text.max_position_embeddings
        self.image = cm.image.to_dict() if cm.image else None
        self._embed = cm.adapter.embed_tokens(cm.model)
        # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40).
        import inspect

        self._cache_kw = "cache" if "cache" in inspect.signature(cm.model.forward).parameters else "past_key_values"

    # --- building blocks ----------------------------------------------------------------------
    def conversation_ids(self, messages, add_generation_prompt: bool = True, grids=None) -> np.ndarray:
        return self.cm.chat.ids(self.cm.tokenizer, messages, add_generation_prompt, grids)

    def prompt_ids(self, prompt: str, with_image: bool, grid: tuple[int, int] = (0, 0)) -> np.ndarray:
        return self.cm.prompt_ids(prompt, with_image, grid=grid)

    def image_grid(self, image) -> tuple[int, int]:
        from edgemed.runtime.preprocess import image_grid

        return image_grid(image, self.image)

    def pixel_values(self, image) -> np.ndarray:
        from edgemed.runtime.preprocess import preprocess

        return preprocess(image, self.image)

    def encode_image(self, pixel_values: np.ndarray) -> np.ndarray:
        from edgemed.reference.parity import parent_image_features

        return parent_image_features(self.cm, pixel_values)

    def logits(self, ids: np.ndarray, pixel_values: np.ndarray | None = None,
               decode_from: int | None = None) -> np.ndarray:
        """The parent's own forward (transformers, not the decomposition): the reference."""
        from edgemed.reference.parity import parent_logits

        return parent_logits(self.cm, ids, pixel_values)

    def _embeds(self, ids: np.ndarray, feats):
        import torch

        t_ids = torch.from_numpy(ids)[None]
        emb = self._embed(t_ids)
        if feats is not None:
            pos = torch.from_numpy(np.flatnonzero(ids == self.image["image_token_id"]))
            f = torch.as_tensor(feats).reshape(-1, feats.shape[-1]).to(emb.dtype)
            if len(pos) != len(f):
                raise ValueError(f"prompt has {len(pos)} image tokens but the encoder gave {len(f)} features")
            emb = emb.clone()
            emb[0, pos] = f
        return t_ids, emb

    def _forward(self, ids: np.ndarray, feats, past):
        """One forward over new tokens after `past`; returns (last-position logits, new past)."""
        import torch

        t_ids, emb = self._embeds(ids, feats)
        kw = {"inputs_embeds": emb, self._cache_kw: past, "use_cache": True}
        if self.cm.adapter.decoder_token_type_ids:
            kw["token_type_ids"] = (t_ids == self.image["image_token_id"]).long() if self.image else torch.zeros_like(t_ids)
        out = self.cm.model(**kw)
        new_past = getattr(out, "cache", None)
        return out.logits[0, -1].float().numpy(), new_past if new_past is not None else out.past_key_values

    # --- generation (the loop is edgemed.runtime.session.GreedyGeneration) ------------------------
    def _encode(self, pixel_values: np.ndarray):
        import torch

        return self.cm.image_features(torch.from_numpy(pixel_values))

    def _prefill(self, ids: np.ndarray, image_features, max_new_tokens: int) -> np.ndarray:
        logits, self._past = self._forward(ids, image_features, None)
        return logits

    def _step(self, token: int) -> np.ndarray:
        logits, self._past = self._forward(np.asarray([token], np.int64), None, self._past)
        return logits

    def _generation_context(self):
        """Decoding with the parent's KV cache, without autograd; times as in the artifact sessions."""
        import torch

        return torch.inference_mode()


def parity_prompt_logits(cm) -> list[np.ndarray]:
    """Logits on the parity prompts (the parity image on even prompts, as check_parity does)."""
    return parent_parity_refs(cm)["logits"]


def parent_parity_refs(cm, prompts=PARITY_PROMPTS) -> dict[str, Any]:
    """The parent's side of check_parity, computed before the artifact is opened (with the weights
    on disk the parent and the artifact are then never resident together): ids, logits and
    image features on the parity prompts, as edgemed's own prompt and pixel code makes them."""
    from edgemed.reference.parity import parent_image_features, parent_logits

    s = ParentSession(cm)
    pv = grid = None
    out: dict[str, Any] = {"ids": [], "logits": []}
    if cm.multimodal:
        pv, grid = s.pixel_values(synthetic_test_image()), s.image_grid(synthetic_test_image())
        out.update(pixel_values=pv, features=parent_image_features(cm, pv))
    for i, prompt in enumerate(prompts):
        with_image = pv is not None and i % 2 == 0
        ids = s.prompt_ids(prompt, with_image, grid or (0, 0))
        out["ids"].append(ids)
        out["logits"].append(parent_logits(cm, ids, pv if with_image else None))
    return out
