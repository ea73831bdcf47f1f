"""GGUF target: writer (gguf-py read-back, q/k permutation), llama.cpp quantization, medical imatrix,
runtime and parity. Writer tests need only gguf-py; the rest importorskip llama_cpp."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from edgemed.errors import BadInputError  # noqa: E402

LLAMA_CPP_REASON = "llama-cpp-python (edgemed[llamacpp]) is not installed: llama.cpp load/quantize checks skipped"
LLAMA256 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from edgemed.models import load_model

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(tiny_dir(family)))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def llama256_dir(tmp_path_factory):
    from edgemed.models.tiny import build_tiny

    return build_tiny("llama", tmp_path_factory.mktemp("llama256") / "m", seed=0, **LLAMA256)


def _fields(reader):
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = f.contents()
        except Exception:  # pragma: no cover - exotic field types
            pass
    return out


# --- writer only (no llama.cpp needed) --------------------------------------------------------------
def test_permute_qk_matches_rope_pairing():
    """HF rotates (i, i + d/2) within a head; llama.cpp rotates (2i, 2i+1). Row 2i of the permuted
    matrix must be HF row i and row 2i+1 HF row i + d/2, head by head, for weights and biases."""
    from edgemed.formats.gguf.language import permute_qk

    n_head, d, cols = 3, 8, 5
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    got = permute_qk(w, n_head)
    ref = np.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            ref[h * d + 2 * i] = w[h * d + i]
            ref[h * d + 2 * i + 1] = w[h * d + i + d // 2]
    np.testing.assert_array_equal(got, ref)
    b = np.arange(n_head * d, dtype=np.float32)
    np.testing.assert_array_equal(permute_qk(b, n_head), ref[:, 0] / cols)


def test_language_gguf_names_metadata_and_tokenizer(loaded, tmp_path):
    from edgemed.formats.gguf.language import permute_qk, write_language_gguf

    cm = loaded("llava-siglip")
    path = tmp_path / "model-f32.gguf"
    write_language_gguf(cm, path, "f32")
    r = gguf.GGUFReader(path)
    f = _fields(r)
    tc = cm.config.text_config
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == tc.num_hidden_layers
    assert f["llama.attention.head_count"] == tc.num_attention_heads
    assert f["llama.attention.head_count_kv"] == tc.num_key_value_heads
    assert f["llama.context_length"] == tc.max_position_embeddings
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(tc.rms_norm_eps)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == tc.vocab_size
    assert len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.chat_template"] == cm.chat_template
    assert f["tokenizer.ggml.eos_token_id"] == cm.tokenizer.eos_token_id
    # Names: exactly gguf-py's canonical names for a Llama decoder.
    T = gguf.MODEL_TENSOR
    want = {gguf.TENSOR_NAMES[t] + ".weight" for t in (T.TOKEN_EMBD, T.OUTPUT_NORM, T.OUTPUT)}
    for i in range(tc.num_hidden_layers):
        want |= {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in (
            T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == want
    # Data: q/k permuted per head, everything else verbatim.
    lm = cm.model.model.language_model
    q = lm.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = lm.layers[0].self_attn.k_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), permute_qk(q, tc.num_attention_heads))
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_k.weight"].data), permute_qk(k, tc.num_key_value_heads))
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight"].data),
                                  lm.layers[0].self_attn.v_proj.weight.detach().numpy())


def test_mmproj_llava_follows_clip_rules(loaded, tmp_path):
    from edgemed.formats.gguf.mmproj import CLIP_FEATURE_LAYER, write_mmproj_gguf

    cm = loaded("llava-siglip")
    write_mmproj_gguf(cm, tmp_path / "mmproj.gguf")
    r = gguf.GGUFReader(tmp_path / "mmproj.gguf")
    f = _fields(r)
    names = {t.name: t for t in r.tensors}
    assert f["general.architecture"] == "clip"
    assert f["clip.projector_type"] == "mlp"
    assert f["clip.vision.projection_dim"] == cm.config.text_config.hidden_size
    assert f["clip.vision.block_count"] == cm.config.vision_config.num_hidden_layers
    assert CLIP_FEATURE_LAYER not in f  # vision_feature_layer == -2 is clip.cpp's default
    assert not any(n.startswith("v.post_ln") for n in names)  # the mlp graph would apply it: wrong embeddings
    for n in ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight", "v.position_embd.weight"):
        assert n in names
    assert names["mm.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16  # projector stays F16
    cm.config.vision_feature_layer = -1
    try:
        write_mmproj_gguf(cm, tmp_path / "mmproj-last.gguf")
    finally:
        cm.config.vision_feature_layer = -2
    f2 = _fields(gguf.GGUFReader(tmp_path / "mmproj-last.gguf"))
    assert f2[CLIP_FEATURE_LAYER] == [cm.config.vision_config.num_hidden_layers]


def test_mmproj_idefics3(loaded, tmp_path):
    from edgemed.formats.gguf.mmproj import write_mmproj_gguf

    cm = loaded("idefics3")
    write_mmproj_gguf(cm, tmp_path / "mmproj.gguf")
    r = gguf.GGUFReader(tmp_path / "mmproj.gguf")
    f = _fields(r)
    names = {t.name for t in r.tensors}
    assert f["clip.projector_type"] == "idefics3"
    assert f["clip.vision.projector.scale_factor"] == cm.config.scale_factor
    assert {"v.post_ln.weight", "mm.model.fc.weight"} <= names


def test_model_llama_cpp_cannot_run_is_refused_before_writing(tiny_dir, tmp_path):
    """The tiny Gemma 3 scales attention by query_pre_attn_scalar=256 with head_dim 16; llama.cpp's
    gemma3 graph always uses 1/sqrt(head_dim), so the GGUF would be silently wrong: refuse (exit 2)."""
    from edgemed.formats.gguf.export import export_gguf
    from edgemed.models import load_model

    cm = load_model(str(tiny_dir("gemma3")))
    with pytest.raises(BadInputError) as e:
        export_gguf(cm, tmp_path / "out")
    assert e.value.exit_code == 2 and "query_pre_attn_scalar" in str(e.value)
    assert not any((tmp_path / "out").glob("*.gguf"))


def test_imatrix_gguf_round_trip(tmp_path):
    from edgemed.formats.gguf.imatrix import ImatrixStats, read_imatrix, write_imatrix_gguf

    stats = ImatrixStats(sums={"blk.0.attn_q.weight": np.array([4.0, 8.0], np.float32)},
                         counts={"blk.0.attn_q.weight": 4}, chunks=2, tokens=4)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", stats, ["calib"])
    f = _fields(gguf.GGUFReader(tmp_path / "imatrix.gguf"))
    assert f["imatrix.datasets"] == ["calib"] and f["imatrix.chunk_count"] == 2
    np.testing.assert_allclose(read_imatrix(tmp_path / "imatrix.gguf")["blk.0.attn_q.weight"], [1.0, 2.0])


def test_runtime_module_does_not_import_torch():
    code = ("import sys, edgemed.formats.gguf.session, edgemed.runtime; "
            "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- through llama.cpp --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava-siglip", "idefics3"])
def test_q8_0_vlm_loads_in_llama_cpp_and_matches_transformers(family, artifact, loaded):
    """Outside edgemed: llama-cpp-python loads the artifact's GGUF, tokenizes with its own
    tokenizer and its logits match transformers' at every position within Q8_0 error."""
    lc = _llama_cpp()
    import torch

    from edgemed.artifact import read_manifest
    from edgemed.reference.metrics import compare_logits

    out = artifact(family, "q8_0")
    m = read_manifest(out)
    assert m.format == "gguf" and m.status == "ok"
    files = {f.path: f for f in m.files}
    assert {"model-q8_0.gguf", "mmproj-f16.gguf"} <= set(files)
    cm = loaded(family)
    text = cm.build_prompt("Is there a pleural effusion on this chest radiograph?", False)
    hf_ids = cm.tokenizer(text, add_special_tokens=False).input_ids
    llm = lc.Llama(model_path=str(out / "model-q8_0.gguf"), n_ctx=256, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == hf_ids  # llama.cpp's tokenizer agrees with the parent's
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    with torch.no_grad():
        ref = cm.model(input_ids=torch.tensor([hf_ids])).logits[0].numpy()
    c = compare_logits(ref, got)
    assert c["positions"] == len(ids) > 10
    assert c["kld_mean"] < 1e-3 and c["logits_max_abs_diff"] < 0.1
    # edgemed's own parity record: all positions, image embeddings from the mmproj
    p = m.parity
    assert p["kld_mean"] < 1e-3 and p["prefill"]["positions"] > 50
    assert p["vision_cosine_min"] > 0.9999
    assert p["kv_cache"] == "f32" and "vision_upstream_issue" not in p


@pytest.mark.slow
def test_clip_cls_tower_marked_wrong_upstream(artifact):
    _llama_cpp()
    from edgemed.artifact import read_manifest

    m = read_manifest(artifact("llava-clip", "q8_0"))
    assert "25814" in m.parity["vision_upstream_issue"]
    assert any("25814" in n for n in m.notes)


def test_q4_k_m_writes_real_q4_k(llama256_dir, tmp_path):
    _llama_cpp()
    from edgemed.pipeline import compress

    out = tmp_path / "q4"
    m = compress(str(llama256_dir), ["q4_k_m"], "cpu-x86-avx2", out).manifest
    r = gguf.GGUFReader(out / "model-q4_k_m.gguf")
    types = {t.name: t.tensor_type for t in r.tensors}
    Q4_K = gguf.GGMLQuantizationType.Q4_K
    assert types["blk.0.attn_q.weight"] == Q4_K and types["blk.1.ffn_gate.weight"] == Q4_K
    assert types["token_embd.weight"] == Q4_K  # policy embed q4_k_m
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q6_K  # policy lm_head q6_k
    assert not any("fallback" in n for n in m.notes)  # 256-wide rows take K-quants
    assert any(n.startswith("imatrix:") for n in m.notes) and (out / "imatrix.gguf").is_file()
    assert m.parity["kld_mean"] < 0.05


@pytest.mark.parametrize("hidden", [64, 256])
def test_plan_sizes_match_what_llama_cpp_quantized(hidden, tmp_path):
    """The plan's GGUF bits per weight follow llama.cpp's own Q4_K_M: Q6_K attn_v / ffn_down in its
    use_more_bits layers, and Q5_0 / Q8_0 for rows K-quants cannot hold (64 wide; 256 are fine)."""
    _llama_cpp()
    from edgemed.models.tiny import build_tiny
    from edgemed.pipeline import compress, resolve
    from edgemed.plan import plan

    model = build_tiny("llama", tmp_path / "m", seed=0, hidden_size=hidden, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8)
    out = tmp_path / "q4"
    compress(str(model), ["q4_k_m"], "cpu-x86-avx2", out)
    r = gguf.GGUFReader(out / "model-q4_k_m.gguf")
    blk = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    actual = sum(int(t.n_bytes) for t in blk) * 8 / sum(int(t.n_elements) for t in blk)
    if hidden == 64:  # the fallback is what llama.cpp wrote
        assert {t.tensor_type.name for t in blk} >= {"Q5_0", "Q4_K", "Q6_K"}
    p = plan(str(model), *resolve(["q4_k_m"], "cpu-x86-avx2")).components
    assert p["language"].bits_per_weight == pytest.approx(actual, rel=0.01)
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert p["embed"].bits_per_weight == pytest.approx(int(embd.n_bytes) * 8 / int(embd.n_elements), rel=0.01)


def test_imatrix_changes_quantized_weights(loaded, tmp_path, llama256_dir):
    _llama_cpp()
    from edgemed.formats.gguf.language import write_language_gguf
    from edgemed.models import load_model
    from edgemed.recipe import load_recipe
    from edgemed.formats.gguf.steps import quantize_gguf
    from edgemed.calibration.samples import calibration_set
    from edgemed.formats.gguf.imatrix import compute_imatrix, write_imatrix_gguf

    cm = load_model(str(llama256_dir))
    policy = load_recipe("q4_k_m").policy
    src = tmp_path / "model-f32.gguf"
    write_language_gguf(cm, src, "f32")
    stats = compute_imatrix(cm, calibration_set(cm, None, "text", 4))
    assert set(stats.sums) >= {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"}
    write_imatrix_gguf(tmp_path / "imatrix.gguf", stats, ["builtin"])
    quantize_gguf(src, tmp_path / "plain.gguf", policy)
    quantize_gguf(src, tmp_path / "imat.gguf", policy, imatrix=tmp_path / "imatrix.gguf")
    a = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(tmp_path / "plain.gguf").tensors}
    b = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(tmp_path / "imat.gguf").tensors}
    changed = [n for n in a if a[n] != b[n]]
    assert "blk.0.attn_q.weight" in changed and "blk.1.ffn_down.weight" in changed
    assert "blk.0.attn_norm.weight" not in changed


def test_multimodal_imatrix_sees_image_positions(loaded):
    from edgemed.calibration.samples import calibration_set
    from edgemed.formats.gguf.imatrix import compute_imatrix

    cm = loaded("llava-siglip")
    mm = calibration_set(cm, None, "multimodal", 2)
    txt = calibration_set(cm, None, "text", 2)
    assert mm.modality == "multimodal" and all(s[2] is not None for s in mm.samples)
    a, b = compute_imatrix(cm, mm), compute_imatrix(cm, txt)
    n_img = cm.image.num_image_tokens
    assert a.counts["blk.0.attn_q.weight"] - b.counts["blk.0.attn_q.weight"] >= 2 * n_img


def test_corrupt_gguf_fails_verify(artifact, tmp_path):
    _llama_cpp()
    from edgemed.artifact import verify

    out = tmp_path / "a"
    shutil.copytree(artifact("llava-siglip", "q8_0"), out)
    assert verify(out) == []
    p = out / "model-q8_0.gguf"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    problems = verify(out)
    assert problems and "model-q8_0.gguf" in problems[0] and "sha256" in problems[0]


def test_truncated_gguf_is_bad_input_not_a_crash(artifact, tmp_path):
    _llama_cpp()
    import edgemed.runtime
    from edgemed.formats.gguf.session import check_gguf_file

    out = tmp_path / "a"
    shutil.copytree(artifact("llava-siglip", "q8_0"), out)
    p = out / "model-q8_0.gguf"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(BadInputError) as e:
        edgemed.runtime.load(out)
    assert e.value.exit_code == 2 and "truncated" in str(e.value)
    with pytest.raises(BadInputError):  # without the manifest's size: the GGUF structure itself
        check_gguf_file(p)
    # and the same through a fresh process, as a user would hit it
    code = f"import edgemed.runtime as r; r.load({str(out)!r})"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # runtime.load's size check (a VerificationError, a BadInputError) refuses it before llama.cpp opens it
    assert run.returncode == 1 and "VerificationError" in run.stderr and "truncated" in run.stderr
    assert "Segmentation" not in run.stderr


@pytest.mark.parametrize("family", ["llava-siglip", "idefics3"])
def test_generate_through_llama_cpp_mtmd(artifact, family):
    """generate(): llama.cpp's own preprocessing and clip (Idefics3: tiles + overview; the overview's
    embeddings fill edgemed's single global-image block)."""
    _llama_cpp()
    import edgemed.runtime
    from edgemed.calibration.builtin import synthetic_test_image

    s = edgemed.runtime.load(artifact(family, "q8_0"), n_threads=1)
    try:
        r = s.generate(synthetic_test_image(64), "Is there an effusion?", max_new_tokens=5)
        assert 1 <= len(r.token_ids) <= 5 and r.ttft_ms > 0 and r.vision_encode_s > 0
        t = s.generate(None, "Is there an effusion?", max_new_tokens=3)
        assert 1 <= len(t.token_ids) <= 3
        assert json.dumps(s.parity_record())
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral", "phi3"])
def test_other_decoders_q8_0_parity(family, artifact):
    """Qwen2 (attention biases, NEOX RoPE), Mistral (as llama), Phi3 (fused qkv and gate_up)."""
    _llama_cpp()
    from edgemed.artifact import read_manifest

    m = read_manifest(artifact(family, "q8_0"))
    p = m.parity
    assert m.status == "ok" and p["kld_mean"] < 1e-3 and p["prefill"]["positions"] > 30
    assert p["llama_cpp_tokenizer_agrees"] is True


def _spm_llama(out):
    """A tiny Llama with a SentencePiece-style (byte-fallback BPE, ▁ for spaces) tokenizer, as
    Llama 2 / Mistral / LLaVA-Med ship it."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from edgemed.models.tiny import _CORPUS, CHATML

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False))
    fast = tf.LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.mark.slow
def test_sentencepiece_style_tokenizer(tmp_path):
    lc = _llama_cpp()
    from edgemed.models import load_model
    from edgemed.pipeline import compress

    src = _spm_llama(tmp_path / "m")
    m = compress(str(src), ["q8_0"], "cpu-x86-avx2", tmp_path / "a").manifest
    f = _fields(gguf.GGUFReader(tmp_path / "a" / "model-q8_0.gguf"))
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.scores"]) == len(f["tokenizer.ggml.tokens"])
    assert f["tokenizer.ggml.token_type"][3] == gguf.TokenType.CONTROL  # <|im_start|> is parsed as special
    assert m.parity["kld_mean"] < 1e-3
    llm = lc.Llama(model_path=str(tmp_path / "a" / "model-q8_0.gguf"), verbose=False)
    try:
        ids = llm.tokenize("<|im_start|>user".encode(), add_bos=False, special=True)
        assert ids[0] == load_model(str(src)).tokenizer.convert_tokens_to_ids("<|im_start|>")
    finally:
        llm.close()
    # llama.cpp's SPM tokenizer merges by score and prefixes "▁" after every special token, so it
    # need not reproduce a tokenizer.json BPE exactly; edgemed's runtime feeds the parent's ids, and
    # parity states whether llama.cpp's own tokenization agrees (for llama-cli / Ollama users).
    assert isinstance(m.parity["llama_cpp_tokenizer_agrees"], bool)


@pytest.mark.slow
def test_gemma3_q8_0_text_and_mmproj(tmp_path):
    """Gemma 3 / MedGemma: norm +1 shift, SWA metadata, gemma3 mmproj (soft-emb norm, pooling
    factor) and bidirectional attention over the image block in llama.cpp."""
    _llama_cpp()
    from edgemed.models.tiny import build_tiny
    from edgemed.pipeline import compress

    src = build_tiny("gemma3", tmp_path / "g3", query_pre_attn_scalar=16)
    m = compress(str(src), ["q8_0"], "cpu-x86-avx2", tmp_path / "a").manifest
    p = m.parity
    assert m.status == "ok"
    assert p["vision_cosine_min"] > 0.9999 and p["kld_mean"] < 1e-3
    f = _fields(gguf.GGUFReader(tmp_path / "a" / "mmproj-f16.gguf"))
    assert f["clip.projector_type"] == "gemma3" and f["clip.vision.projector.scale_factor"] == 2


@pytest.mark.parametrize("family,modality", [("llama", "text"), ("llava-siglip", "multimodal")])
def test_imatrix_layer_by_layer_equals_whole_model_passes(loaded, family, modality):
    """The imatrix taken one decoder layer at a time over every sample (calibration.sequential) holds
    what forward hooks on every Linear see over whole-model passes of the parent, image tokens included."""
    import torch

    from edgemed.calibration.samples import calibration_set
    from edgemed.formats.gguf.imatrix import compute_imatrix
    from edgemed.formats.gguf.language import language_tensors
    from edgemed.reference.parity import parent_logits
    from edgemed.runtime.preprocess import tiles

    cm = loaded(family)
    calib = calibration_set(cm, None, modality, 3)
    names = {id(p): new for _, new, p in language_tensors(cm)}
    sums, counts = {}, {}

    def hook(name):
        def fn(mod, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(names[id(m.weight)])) for m in cm.model.modules()
               if isinstance(m, torch.nn.Linear) and id(m.weight) in names]
    try:
        for prompt, answer, image in calib.samples:
            pv, rows, cols = tiles(image, cm.image.to_dict()) if image is not None else (None, 0, 0)
            parent_logits(cm, cm.prompt_ids(prompt, image is not None, answer, grid=(rows, cols)), pv)
    finally:
        for h in handles:
            h.remove()
    stats = compute_imatrix(cm, calib)
    assert set(stats.sums) == set(sums) and stats.counts == counts and stats.chunks == 3
    assert "output.weight" in stats.sums or "token_embd.weight" not in stats.sums
    for name, s in sums.items():
        np.testing.assert_allclose(stats.sums[name], s.float().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
