"""The tokenizer in llama.cpp's vocabulary: tokens, merges or scores, special tokens, chat template."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemed.errors import BadInputError
from edgemed.formats.gguf.writer import gguf_py

if TYPE_CHECKING:  # pragma: no cover
    from edgemed.models import CompositeModel


# --- tokenizer ----------------------------------------------------------------------------------------
def _pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json's structure
    (llama.cpp's converter hashes a probe string instead; this recognises the common shapes and
    refuses the rest, rather than guessing)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex", "")
        if "\\p{N}{1,3}" in regex:
            return "llama-bpe"
        if "\\p{N}|" in regex or regex.endswith("\\p{N}"):
            return "qwen2"
    raise BadInputError("tokenizer.json pre_tokenizer", f"unrecognised byte-level BPE pre-tokenizer {kinds}",
                        "llama.cpp would tokenize this model differently from transformers; use an ONNX recipe")


def write_tokenizer(w, cm: "CompositeModel", tc) -> dict[str, Any]:
    """Vocabulary, merges or scores, special tokens and the chat template."""
    gguf = gguf_py()
    tok = cm.tokenizer
    with tempfile.TemporaryDirectory() as td:
        tok.save_pretrained(td)
        tj_path = Path(td) / "tokenizer.json"
        if not tj_path.exists():
            raise BadInputError(f"{cm.source}: tokenizer", "has no tokenizer.json (a fast tokenizer)",
                                "save the model with a fast tokenizer (tokenizer.json)")
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj["model"]
        n_vocab = int(tc.vocab_size)
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            # SentencePiece-style BPE (Llama 2, Mistral, Gemma): llama.cpp's "llama" tokenizer.
            vocab = gguf.LlamaHfVocab(Path(td))
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(ttype)
            # gguf-py marks only bos/eos/unk as control; every special added token (e.g. <|im_start|>)
            # must be CONTROL or llama.cpp will not parse it out of a prompt.
            for a in tj.get("added_tokens", []):
                if a["id"] < len(types) and types[a["id"]] != gguf.TokenType.BYTE:
                    types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
            kind, pre = "llama", "default"
        elif model.get("type") == "BPE":
            pre = _pre_tokenizer_name(tj)
            kind = "gpt2"
            by_id = {i: t for t, i in model["vocab"].items()}
            special = {}
            for a in tj.get("added_tokens", []):
                by_id[a["id"]] = a["content"]
                special[a["id"]] = a.get("special", False)
            tokens, types, scores = [], [], None
            for i in range(max(n_vocab, max(by_id) + 1)):
                if i not in by_id:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                    continue
                tokens.append(by_id[i])
                if i in special:
                    types.append(gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED)
                else:
                    types.append(gguf.TokenType.NORMAL)
        else:
            raise BadInputError(f"{cm.source}: tokenizer", f"model type '{model.get('type')}' has no GGUF mapping",
                                "GGUF supports BPE (byte-level or SentencePiece-style) tokenizers")
        if len(tokens) > n_vocab:
            raise BadInputError(f"{cm.source}: tokenizer", f"has {len(tokens)} tokens but the model {n_vocab} rows",
                                "the tokenizer does not belong to this model")
        while len(tokens) < n_vocab:
            tokens.append(f"[PAD{len(tokens)}]")
            types.append(gguf.TokenType.UNUSED)
            if scores is not None:
                scores.append(-1000.0)
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        sv = gguf.SpecialVocab(td, load_merges=kind == "gpt2", n_vocab=n_vocab)
    # Ids straight from the loaded tokenizer (the folder's config.json may be a VLM's, with nested ids).
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    sv.special_token_ids = {k: int(v) for k, v in ids.items() if v is not None}
    probe = tok("a").input_ids
    sv.add_special_token = {"bos": bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]),
                            "eos": bool(tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id])}
    sv.chat_template = None
    sv.add_to_gguf(w, quiet=True)
    if cm.chat_template:
        w.add_chat_template(cm.chat_template)
    # Every end-of-generation id the parent stops on (e.g. <|im_end|> besides <|endoftext|>).
    eos = [i for i in cm.text.eos_token_ids if i != tok.eos_token_id]
    if eos:
        w.add_eot_token_id(int(eos[0]))
    return {"tokenizer_model": kind, "tokenizer_pre": pre, "vocab": len(tokens)}
