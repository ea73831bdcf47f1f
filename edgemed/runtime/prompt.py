"""Conversations to token ids, as the Hugging Face processor (or, for a text-only model, the
tokenizer) builds them; shared by the parent, the artifact sessions, parity and calibration.

Torch-free: jinja2 in a sandbox (a model's chat template is data, never trusted code), with the
extensions transformers gives a template (`{% generation %}`, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, loop controls), as in
transformers.utils.chat_template_utils._cached_compile_jinja_template.

A message's content is a string, or a list of typed parts ({"type": "text", "text": ...},
{"type": "image"}) as processors take it. Templates written for typed parts (llava-hf, SmolVLM,
Gemma 3) get typed parts; templates written for strings (ChatML, Llama 3, Phi-3) get strings with
each image as the family's placeholder. Which one a template takes is found by rendering a probe
both ways, as google/minja's chat-template capability check does (`requires_typed_content`).
After rendering, each image placeholder is expanded into the family's image block (LLaVA
`<image>` x N, Idefics3 `<fake_token_around_image><global-img>...`, Gemma 3 `<start_of_image>` +
soft tokens + `<end_of_image>`), as the processors do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgemed.errors import BadInputError

_NEEDLE = "edgemed-probe-7f3a9"
ROLES = ("system", "user", "assistant", "tool")


@lru_cache(maxsize=16)
def _template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant tokens for
        training masks); rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):  # no underscore attributes: no way towards CPython internals
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise BadInputError("chat template", f"is not valid Jinja ({e.message}, line {e.lineno})",
                            "fix the template in tokenizer_config.json / chat_template.jinja") from None


@lru_cache(maxsize=16)
def content_kind(source: str, prefer_typed: bool, specials: tuple[tuple[str, str], ...] = ()) -> str:
    """"typed" or "string": the message content this template renders. A template that renders both
    gets typed parts when `prefer_typed` (a VLM's processor) and strings otherwise (a text LLM's
    tokenizer), as each is used in transformers."""
    compiled = _template(source)  # a syntax error is the template's own, said as such

    def renders(content) -> bool:
        try:
            out = compiled.render(messages=[{"role": "user", "content": content}],
                                           add_generation_prompt=True, **dict(specials))
        except Exception:  # a probe that a template rejects says only that it does not take this form
            return False
        # A string template given parts prints their Python repr: that is not rendering them.
        return _NEEDLE in out and "'type'" not in out

    typed = renders([{"type": "text", "text": _NEEDLE}])
    if typed and prefer_typed:
        return "typed"
    if renders(_NEEDLE):
        return "string"
    if typed:
        return "typed"
    raise BadInputError("chat template", "renders a user message neither as a string nor as typed parts "
                        "(the question would be dropped)", "give the model a chat template that prints "
                        "message['content'] (or its parts' 'text')")


def user_turn(prompt: str, with_image: bool) -> list[dict[str, Any]]:
    """One user message: the image (if any) first, then the question, as processors' examples write it."""
    parts: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checked copies of chat messages, content as typed parts. Accepts OpenAI-style parts too
    ({"type": "image_url", ...} counts as an image; the pixels are passed separately)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadInputError("messages", "must be a non-empty list of {'role', 'content'} dicts",
                            'pass e.g. [{"role": "user", "content": "Is there an effusion?"}]')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise BadInputError(f"messages[{i}]", f"needs a role among {', '.join(ROLES)}",
                                'write {"role": "user", "content": ...}')
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            parts = []
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind in ("image", "image_url"):
                    parts.append({"type": "image"})
                else:
                    raise BadInputError(f"messages[{i}].content[{j}]", f"unsupported part {str(p)[:80]}",
                                        'use {"type": "text", "text": ...} or {"type": "image"}')
        else:
            raise BadInputError(f"messages[{i}].content", "must be a string or a list of typed parts",
                                'write "content": "..." or [{"type": "image"}, {"type": "text", "text": "..."}]')
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": parts})
    return out


def count_images(messages: list[dict[str, Any]]) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def image_block(image: dict[str, Any], grid: tuple[int, int] = (0, 0)) -> str:
    """The text that stands for one image: prefix + the image token repeated + suffix; for an image
    cut into rows x cols tiles (Idefics3 / SmolVLM), first each tile's block, row by row, as
    Idefics3Processor writes them (`<fake_token_around_image><row_R_col_C>` + the tokens, a newline
    after each row), then a blank line and the whole image's block."""
    one = image["image_token"] * image["num_image_tokens"]
    rows, cols = grid
    whole = image["prefix"] + one + image["suffix"]
    if not (rows or cols):
        return whole
    marker = image["tile_marker"]
    text = "".join("".join(f"{marker}<row_{r + 1}_col_{c + 1}>{one}" for c in range(cols)) + "\n" for r in range(rows))
    return text + "\n" + whole


@dataclass
class ChatFormat:
    """How one model turns a conversation into token ids (stored in the manifest's model record).

    add_special_tokens: a VLM's processor tokenizes the rendered text with the tokenizer's special
    tokens (a BOS) unless the text already starts with BOS (ProcessorMixin.apply_chat_template); a
    text LLM's tokenizer.apply_chat_template never adds them (the template writes BOS itself)."""

    template: str | None
    special_tokens: dict[str, str] = field(default_factory=dict)
    image: dict[str, Any] | None = None
    add_special_tokens: bool = False

    @classmethod
    def of_record(cls, text: dict[str, Any], image: dict[str, Any] | None, template: str | None) -> "ChatFormat":
        specials = dict(text.get("special_tokens") or {})
        if not specials and text.get("bos_token"):  # manifests written before special_tokens was recorded
            specials = {"bos_token": text["bos_token"], "eos_token": ""}
        return cls(template, specials, image, bool(text.get("add_special_tokens", False)))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               grids: list[tuple[int, int]] | None = None) -> str:
        """The text to tokenize: the template rendered, every image placeholder expanded (`grids`:
        each image's tile grid, edgemed.runtime.preprocess.image_grid, where the model cuts images)."""
        messages = normalize_messages(messages)
        n_images = count_images(messages)
        if n_images and self.image is None:
            raise BadInputError("image", "this model is text-only", "send the conversation without images")
        placeholder = self.image["placeholder"] if self.image else ""
        if not self.template:
            text = "\n".join(_as_string(m["content"], placeholder) for m in messages)
        else:
            specials = tuple(sorted(self.special_tokens.items()))
            kind = content_kind(self.template, self.image is not None, specials)
            if kind == "string":
                messages = [{**m, "content": _as_string(m["content"], placeholder)} for m in messages]
            try:
                text = _template(self.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       **self.special_tokens)
            except Exception as e:  # the template's own raise_exception (roles out of order, ...) is the user's input
                raise BadInputError("messages", f"the model's chat template refused them ({str(e)[:200]})",
                                    "order the roles as the model expects (e.g. user/assistant alternating)") from None
        return self.expand_images(text, n_images, grids)

    def expand_images(self, text: str, n_images: int, grids: list[tuple[int, int]] | None = None) -> str:
        if self.image is None:
            return text
        pieces = text.split(self.image["placeholder"])
        if len(pieces) - 1 != n_images:
            raise BadInputError("chat template", f"rendered {len(pieces) - 1} image placeholder(s) "
                                f"({self.image['placeholder']!r}) for {n_images} image(s)",
                                "each image needs exactly one {'type': 'image'} part; check that the template "
                                "prints images and that the text holds no placeholder of its own")
        if self.image.get("tile_marker") and grids is None:
            raise ValueError("this model cuts images into tiles: pass each image's grid (preprocess.image_grid)")
        grids = list(grids or [(0, 0)] * n_images)
        if len(grids) != n_images:
            raise ValueError(f"{len(grids)} tile grid(s) for {n_images} image(s)")
        out = [pieces[0]]
        for grid, piece in zip(grids, pieces[1:]):
            out += [image_block(self.image, grid), piece]
        return "".join(out)

    def tokenize(self, tokenizer, text: str) -> list[int]:
        """Ids for rendered text with a `tokenizers.Tokenizer` or a transformers tokenizer."""
        bos = self.special_tokens.get("bos_token")
        special = self.add_special_tokens and not (bos and text.startswith(bos))
        enc = tokenizer.encode(text, add_special_tokens=special)
        return list(getattr(enc, "ids", enc))

    def ids(self, tokenizer, messages, add_generation_prompt: bool = True, grids: list[tuple[int, int]] | None = None):
        import numpy as np

        return np.asarray(self.tokenize(tokenizer, self.render(messages, add_generation_prompt, grids)), dtype=np.int64)


def _as_string(parts: list[dict[str, Any]], placeholder: str) -> str:
    return "\n".join(placeholder if p["type"] == "image" else p["text"] for p in parts)


def conversation(messages=None, images=None, prompt: str | None = None, image=None) -> tuple[list, list]:
    """(messages, images) from either the conversation form or the one-shot shortcut."""
    if messages is None:
        if images:
            raise BadInputError("images", "given without messages", "pass messages=[...] with one image part per image")
        return user_turn(prompt or "", image is not None), ([image] if image is not None else [])
    if image is not None or prompt:
        raise BadInputError("generate()", "got both messages= and image=/prompt=", "put the question and the image "
                            "parts into messages, and the images into images=[...]")
    messages = normalize_messages(messages)
    images = list(images or [])
    if count_images(messages) != len(images):
        raise BadInputError("images", f"{len(images)} image(s) for {count_images(messages)} image part(s) in messages",
                            "pass one image per {'type': 'image'} part, in order")
    return messages, images


class PromptAndPixels:
    """prompt_ids() and pixel_values() for sessions that hold a `tokenizers.Tokenizer`
    (`self.tokenizer`), the manifest's `self.chat_template`, `self.text` and `self.image` facts:
    the ONNX, GGUF and TensorRT sessions build inputs identically, so parity compares like with like."""

    @property
    def chat(self) -> ChatFormat:
        return ChatFormat.of_record(self.text, self.image, self.chat_template)

    def conversation_ids(self, messages, add_generation_prompt: bool = True, grids: list[tuple[int, int]] | None = None):
        return self.chat.ids(self.tokenizer, messages, add_generation_prompt, grids)

    def prompt_ids(self, prompt: str, with_image: bool, grid: tuple[int, int] = (0, 0)):
        return self.conversation_ids(user_turn(prompt, with_image), grids=[grid] if with_image else [])

    def image_grid(self, image) -> tuple[int, int]:
        from edgemed.runtime.preprocess import image_grid

        return image_grid(image, self.image)

    def pixel_values(self, image):
        from edgemed.runtime.preprocess import preprocess

        if self.image is None:
            raise BadInputError("image", "this artifact's model is text-only", "call generate() without an image")
        return preprocess(image, self.image)
