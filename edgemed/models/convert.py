"""`edgemed convert`: a checkpoint, normalised into its edgemed family, written as a plain Hugging
Face folder (config.json, model.safetensors, tokenizer, processor with its chat template), so the
same model that edgemed compresses also loads with transformers alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from edgemed.errors import BadInputError

PROVENANCE = "edgemed_convert.json"


def convert(source: str, output: str | Path, *, vision_tower: str | None = None, overwrite: bool = False,
            allow_pickle: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Load `source` as edgemed does (normalising checkpoints of a model's own code, such as
    LLaVA-Med's llava_mistral) and save it to `output` with transformers' save_pretrained."""
    from edgemed._version import __version__
    from edgemed.atomic import atomic_directory, remove_stale_siblings
    from edgemed.models import load_model, normaliser_for, raw_config

    say = progress or (lambda msg: None)
    out = Path(output).resolve()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise BadInputError(str(output), "already exists", "choose a new --output, or pass --overwrite")
        if out.is_symlink() or not out.is_dir() or (any(out.iterdir()) and not (out / PROVENANCE).is_file()):
            raise BadInputError(str(output), f"is not a folder `edgemed convert` wrote (no {PROVENANCE})",
                                "choose another --output; --overwrite never deletes a folder edgemed did not write")
    if not out.parent.is_dir():
        raise BadInputError(str(output), f"parent folder {out.parent} does not exist", "create it first")
    remove_stale_siblings(out)
    normaliser = normaliser_for(raw_config(source))
    say(f"load {source}")
    cm = load_model(source, allow_pickle=allow_pickle, vision_tower=vision_tower)
    with atomic_directory(out) as tmp:
        say("write safetensors")
        cm.model.save_pretrained(tmp)
        (cm.processor or cm.tokenizer).save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps({
            "source": source, "family": cm.family, "normaliser": normaliser.name if normaliser else None,
            "vision_tower": vision_tower, "edgemed_version": __version__,
        }, indent=2))
    return out
