"""edgemed's chat-template rendering against transformers' own renderer
(transformers.utils.chat_template_utils.render_jinja_template) on the real templates of the
checkpoints edgemed claims (tests/fixtures/checkpoints/*/: each README names the file's source)."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
SPECIALS = {
    "llama-3.1-8b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama-3.2-3b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral-7b-instruct-v0.2": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "mistral-nemo-instruct-2407": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "phi-3-mini-4k-instruct": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "phi-3.5-mini-instruct": {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"},
    "qwen2.5-7b-instruct": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "gemma-2-2b-it": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "gemma-3-4b-it": {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    "llava-1.5-7b-hf": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}
# The multimodal templates and what they print for one image (the processor expands it afterwards).
IMAGE_MARK = {"gemma-3-4b-it": "<start_of_image>", "llava-1.5-7b-hf": "<image>"}
Q = "Is there a pleural effusion?"
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": Q}],
    "system and history": [{"role": "system", "content": "You are a radiology assistant."},
                           {"role": "user", "content": "Describe the image."},
                           {"role": "assistant", "content": "A frontal chest x-ray."},
                           {"role": "user", "content": Q}],
    "history": [{"role": "user", "content": "Describe the image."},
                {"role": "assistant", "content": "A frontal chest x-ray."}, {"role": "user", "content": Q}],
}


def _templates():
    for folder in sorted(FIXTURES.iterdir()):
        for f in sorted(folder.glob("chat_template*.jinja")):
            yield pytest.param(folder.name, f, id=f"{folder.name}/{f.name}")


def _typed(messages, with_image):
    out = []
    for i, m in enumerate(messages):
        parts = [{"type": "text", "text": m["content"]}]
        if with_image and i == next(j for j, x in enumerate(messages) if x["role"] == "user"):
            parts.insert(0, {"type": "image"})
        out.append({**m, "content": parts})
    return out


def _theirs(template, messages, specials):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                        **specials)
    return rendered[0]


@pytest.mark.parametrize("name,path", list(_templates()))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
def test_rendering_equals_transformers(name, path, conv):
    """The same text transformers renders, in the form the model's users pass: strings to a text LLM's
    tokenizer, typed parts (with an image) to a VLM's processor. A conversation the template refuses
    (Gemma 2 has no system role) is refused by both, with edgemed naming the input."""
    from edgemed.errors import BadInputError
    from edgemed.runtime.prompt import ChatFormat

    template, specials = path.read_text(), SPECIALS[name]
    mark = IMAGE_MARK.get(name)
    image = ({"placeholder": mark, "prefix": "", "suffix": "", "image_token": mark, "num_image_tokens": 1}
             if mark else None)
    chat = ChatFormat(template, specials, image)
    messages = CONVERSATIONS[conv]
    theirs_in = _typed(messages, with_image=mark is not None) if mark else messages
    try:
        theirs = _theirs(template, theirs_in, specials)
    except Exception as e:
        with pytest.raises(BadInputError, match="chat template refused"):
            chat.render(_typed(messages, with_image=mark is not None))
        pytest.skip(f"the template itself refuses this conversation: {e}")
    ours = chat.render(_typed(messages, with_image=mark is not None))
    assert ours == theirs
    assert Q in ours
    if mark:
        assert ours.count(mark) == 1


def test_generation_tag_and_typed_parts_of_the_llava_hf_template():
    """The bug this replaced: llava-hf's template rendered 'USER:  ASSISTANT:' (question and image
    dropped) and its {% generation %} tag was a TemplateSyntaxError."""
    from edgemed.runtime.prompt import ChatFormat, content_kind, user_turn

    template = (FIXTURES / "llava-1.5-7b-hf" / "chat_template.jinja").read_text()
    assert content_kind(template, True) == "typed"
    image = {"placeholder": "<image>", "prefix": "", "suffix": "", "image_token": "<image>", "num_image_tokens": 3}
    text = ChatFormat(template, {}, image).render(user_turn(Q, True))
    assert text == f"USER: <image><image><image>\n{Q} ASSISTANT:"


def test_string_templates_get_strings_and_images_as_the_placeholder():
    from edgemed.models.tiny import CHATML
    from edgemed.runtime.prompt import ChatFormat, content_kind, user_turn

    assert content_kind(CHATML, True) == "string"
    image = {"placeholder": "<image>", "prefix": "<a>", "suffix": "<b>", "image_token": "<i>", "num_image_tokens": 2}
    text = ChatFormat(CHATML, {}, image).render(user_turn(Q, True))
    assert text == f"<|im_start|>user\n<a><i><i><b>\n{Q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("template,match", [
    ("{% for m in messages %}{{ m['role'] }}{% endfor %}", "neither as a string nor as typed parts"),
    ("{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}", "rendered 0 image placeholder"),
    ("{% for m in messages %}{{ m['content'] }", "not valid Jinja"),
])
def test_templates_that_would_drop_the_prompt_or_the_image_are_refused(template, match):
    from edgemed.errors import BadInputError
    from edgemed.runtime.prompt import ChatFormat, user_turn

    image = {"placeholder": "<image>", "prefix": "", "suffix": "", "image_token": "<image>", "num_image_tokens": 1}
    with pytest.raises(BadInputError, match=match):
        ChatFormat(template, {}, image).render(user_turn(Q, True))


@pytest.mark.parametrize("messages,images,match", [
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}], [], "0 image"),
    ([{"role": "doctor", "content": Q}], [], "needs a role"),
    ([{"role": "user", "content": [{"type": "audio"}]}], [], "unsupported part"),
    ([], [], "non-empty list"),
])
def test_conversation_input_errors_name_the_input(messages, images, match):
    from edgemed.errors import BadInputError
    from edgemed.runtime.prompt import conversation

    with pytest.raises(BadInputError, match=match):
        conversation(messages, images)


def test_sandbox_still_holds():
    """Templates are data: no attribute walk to Python internals, no underscore namespace attributes."""
    from edgemed.errors import BadInputError
    from edgemed.runtime.prompt import ChatFormat

    for evil in ("{{ messages.__class__.__mro__ }}{{ messages[0]['content'] }}",
                 "{% set ns = namespace() %}{% set ns._x = 1 %}{{ messages[0]['content'] }}"):
        with pytest.raises(BadInputError):
            ChatFormat(evil, {}).render([{"role": "user", "content": Q}])
