"""Calibration feeds for exported graphs, computed by the PyTorch parent."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel


def decoder_feeds(cm: "CompositeModel", source: str | None, count: int, record: dict | None = None) -> list[dict]:
    """Prefill feeds for the decoder graph from the calibration set `source` (a recipe's `calibration`): each prompt (with its
    image where the model has a vision tower) embedded by the PyTorch model, an empty past. `record`, if given,
    receives the set's record (the manifest's `calibration` field)."""
    from edgemed.calibration.samples import calibration_set

    calib = calibration_set(cm, source, "multimodal" if cm.multimodal else "text", count)
    if record is not None:
        record.update(calib.record())
    return feeds_for(cm, calib)


def feeds_for(cm: "CompositeModel", calib) -> list[dict]:
    """decoder_feeds of a calibration set already drawn (calibration.samples.Calibration)."""
    import torch

    from edgemed.runtime.preprocess import image_grid, preprocess

    embed = cm.adapter.embed_tokens(cm.model)
    t = cm.text
    feeds = []
    for prompt, answer, image in calib.samples:
        with_image = image is not None and cm.multimodal
        grid = image_grid(image, cm.image.to_dict()) if with_image else (0, 0)
        ids = torch.from_numpy(cm.prompt_ids(prompt, with_image, answer, grid=grid))
        with torch.no_grad():
            emb = embed(ids[None]).float()
            image_mask = ids == cm.image.image_token_id if cm.multimodal else torch.zeros_like(ids, dtype=torch.bool)
            if with_image:
                pv = torch.from_numpy(preprocess(image, cm.image.to_dict()))
                emb[0, image_mask] = cm.image_features(pv).reshape(-1, emb.shape[-1])
        feeds.append(_feed(t, emb.numpy(), image_mask.numpy()))
    return feeds


def token_feeds(cm: "CompositeModel", sequences) -> list[dict]:
    """Prefill feeds of token id sequences (text only: e.g. the parent's own answers that distill
    trains on, kd_data.generate), embedded by the PyTorch model, an empty past."""
    import numpy as np
    import torch

    embed = cm.adapter.embed_tokens(cm.model)
    feeds = []
    for ids in sequences:
        ids = np.asarray(ids, np.int64)
        with torch.no_grad():
            emb = embed(torch.from_numpy(ids)[None]).float().numpy()
        feeds.append(_feed(cm.text, emb, np.zeros(len(ids), bool)))
    return feeds


def _feed(t, emb, image_mask) -> dict:
    """One prefill feed: embeddings [1, n, hidden], the image positions [n], an empty past."""
    import numpy as np

    n = emb.shape[1]
    feed = {"inputs_embeds": emb, "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None], "token_type_ids": image_mask[None].astype(np.int64)}
    for i in range(t.num_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
    return feed
