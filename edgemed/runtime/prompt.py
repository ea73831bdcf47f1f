"""Chat-template rendering and image-placeholder expansion, shared by the parent and the runtime.

Torch-free: jinja2 in a sandbox (a model's chat template is data, never trusted code).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def _template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise ValueError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def image_block(image: dict[str, Any]) -> str:
    """The text that stands for one image: prefix + the image token repeated + suffix."""
    return image["prefix"] + image["image_token"] * image["num_image_tokens"] + image["suffix"]


def render_prompt(chat_template: str | None, prompt: str, image: dict[str, Any] | None,
                  bos_token: str | None = None) -> str:
    """The exact text to tokenize (with add_special_tokens=False) for one user turn."""
    content = (image_block(image) + "\n" + prompt) if image else prompt
    if not chat_template:
        return content
    return _template(chat_template).render(
        messages=[{"role": "user", "content": content}], add_generation_prompt=True,
        bos_token=bos_token or "", eos_token="",
    )


class PromptAndPixels:
    """prompt_ids() and pixel_values() for sessions that hold a `tokenizers.Tokenizer`
    (`self.tokenizer`), the manifest's `self.chat_template`, `self.text` and `self.image` facts:
    the ONNX, GGUF and TensorRT sessions build inputs identically, so parity compares like with like."""

    def prompt_ids(self, prompt: str, with_image: bool):
        import numpy as np

        text = render_prompt(self.chat_template, prompt, self.image if with_image else None,
                             bos_token=self.text.get("bos_token"))
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def pixel_values(self, image):
        from edgemed.errors import BadInputError
        from edgemed.runtime.preprocess import preprocess

        if self.image is None:
            raise BadInputError("image", "this artifact's model is text-only", "call generate() without an image")
        return preprocess(image, self.image)
