"""
The target: a from-scratch Llama-family model (Llama-2/3/3.1, Vicuna, TinyLlama, SmolLM2), its static KV cache, a
CUDA-graph wrapper of static-shape steps, then its loader of Hugging Face-format directories.

    model = load_hf("path/to/hf_dir", device="cuda", dtype=torch.bfloat16)
    logits, h = model(tokens)                         # tokens (B, T) -> logits (B, T, V), states h (B, T, dim)
    model, tok = convert.load_target()                # + its tokenizer; a GGUF or the default SmolLM2 (convert.py)

The weights use the Hugging Face layout (q/k rows ordered for `rotate_half` RoPE), so an HF checkpoint loads
with one literal name map and no permutation. `forward` returns the logits and the top-layer hidden states
*after* the final RMSNorm (what the LM head reads): those are the states the Beagle draft attends to.
"""
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from common import BeagleError, read_json


@dataclass
class ModelArgs:
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    vocab_size: int = 49152
    hidden_dim: int = 1536  # SwiGLU inner size
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF's dict; only rope_type "llama3" or "linear" changes anything
    max_seq_len: int = 2048  # the context the model was trained for
    tie_embeddings: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads


# -----------------------------------------------------------------------------
# the model: Llama with HF's weight layout, a static KV cache, and a CUDA-graph wrapper of static-shape steps

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # F.rms_norm normalises in fp32 whatever x's dtype and rounds once, after the weight (HF rounds before it
        # too: an ulp apart at most in bf16, the same numbers in fp32); one fused kernel on the GPU. x goes to the
        # weight's dtype: a no-op, except under autocast (an fp32 draft on bf16 inputs), where it normalises in fp32
        return F.rms_norm(x.to(self.weight.dtype), self.weight.shape, self.weight, self.eps)


def rope_frequencies(args):
    """Inverse frequencies (head_dim/2,), with Llama-3.1's long-context rescaling when the config asks."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = args.rope_scaling or {}
    if sc.get("rope_type", sc.get("type")) == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)  # long waves: slowed down
        smooth = (old_len / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)  # in between: interpolated
        inv_freq = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif sc.get("rope_type", sc.get("type")) == "linear":  # position interpolation (e.g. Vicuna-16k)
        inv_freq = inv_freq / sc["factor"]
    elif sc.get("rope_type", sc.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope_scaling {sc}")
    return inv_freq


def rope_table(args, length):
    """(length, 2, head_dim): cos and sin of positions 0..length-1, computed once per model in fp32 as HF does, and
    rounded to the model's dtype with the model (HF rounds them too). HF's layout (angles repeated for both halves),
    with the first half of sin negated: rotate_half(x) * sin is then swap_halves(x) * sin (apply_rope)."""
    angles = torch.arange(length).float()[:, None] * rope_frequencies(args)  # (L, D/2)
    angles = torch.cat([angles, angles], -1)  # (L, D)
    sign = torch.ones(args.head_dim).index_fill_(0, torch.arange(args.head_dim // 2), -1.0)
    return torch.stack([angles.cos(), angles.sin() * sign], 1)


def apply_rope(x, cos, sin):
    """x (B, T, H, D), cos and sin (T, H or 1, D) rows of rope_table: HF's x * cos + rotate_half(x) * sin, where
    rotate_half(x) = (-x2, x1) is the two halves swapped (one flip) and the minus is in the table."""
    return torch.addcmul(x * cos, x.unflatten(-1, (2, -1)).flip(-2).flatten(-2), sin)


def linear(x, weight, bias=None):
    """F.linear with a CPU fast path for decoding: for a few rows without autograd, the CPU BLAS reads the weights
    much faster through W @ x.T with 2 or 4 rows than through F.linear's matrix-vector path with one (see README).
    Decoding is bound by reading the weights, so 1 and 3 rows are padded to 2 and 4 (copies of the first row), and a
    forward of 1 to 4 tokens costs about the same: what makes verifying a small tree nearly free. Same numbers up
    to fp32 rounding; everything else (GPU, training, other dtypes, more than 8 rows) takes F.linear."""
    rows = x.numel() // x.shape[-1]
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not 0 < rows <= 8
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, -1)
    pad = (2 if rows <= 2 else 4 if rows <= 4 else rows) - rows  # 1 and 3 rows: slower than 2 and 4
    x2 = torch.cat([x2, x2[:1].expand(pad, -1)]) if pad else x2
    y = (weight @ x2.T).T[:rows].contiguous()  # (contiguous: strided outputs slow every later op down)
    y = y if bias is None else y + bias
    return y.reshape(*x.shape[:-1], -1)


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


def any_length():
    """A context for eager forwards of any length (prefills): SDPA without cuDNN's backend, which pays a first-call
    cost at every new shape (measured per new prompt length: results/README.md), so that a prompt of a new length
    costs what its arithmetic does. Captured steps have one shape per width: they keep it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attention(q, k, v, mask):
    """SDPA of q (B, H, T, D) over k, v (B, Hkv, S, D) with an explicit mask (B|1, 1, T, S), for grouped-query
    attention (g = H / Hkv query heads share a kv head) without copying K/V g times. On CUDA, SDPA takes the
    shared heads as they are (enable_gqa). On the CPU the g query heads of a kv head are read as g x T query rows
    of that one head, with the mask's rows tiled to match. Each form measured the faster one on its device
    (results/README.md, "Attention")."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if q.is_cuda or H == Hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
    rows = mask.repeat(*[1] * (mask.dim() - 2), H // Hkv, 1)  # row j T + t = row t
    y = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv * T, D), k, v, attn_mask=rows)
    return y.reshape(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one matrix: rows of q (H heads), then k (Hkv heads), then v (Hkv heads)
        self.wqkv = Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, slots, mask, cache, layer):
        B, T, _ = x.shape
        H = self.n_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * self.n_kv_heads, self.head_dim)
        # one rotation for all the heads: cos, sin (T, H + 2 Hkv, D) leave v as it is (see Transformer.forward)
        qkv = apply_rope(qkv, cos, sin).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        q, kv = qkv[:, :H], qkv[:, H:]  # (B, H, T, D), (B, 2 Hkv, T, D)
        if cache is not None:
            kv = cache.update(layer, slots, kv)  # (B, 2 Hkv, L, D)
            if mask is not None:  # the mask's width says how much of the cache is live
                kv = kv[:, :, :mask.shape[-1]]
        k, v = kv.chunk(2, dim=1)  # (B, Hkv, S, D) each
        if mask is None:  # plain causal attention over this call's tokens: SDPA's fused kernels take GQA as it is
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != self.n_kv_heads)
        else:
            y = attention(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w13 = Linear(dim, 2 * hidden_dim, bias=False)  # rows of gate (w1), then up (w3)
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, slots, mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, slots, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(args, args.max_seq_len), persistent=False)  # cast with the model

    def forward(self, tokens, positions=None, cache=None, mask=None, slots=None, last_only=False):
        """tokens (B, T); positions (T,) absolute, shared by the batch (default 0..T-1); mask bool, True =
        may attend, broadcastable to (B, H, T, S) where S is T without a cache and the number of live cache
        slots with one. No mask means plain causal attention over this call's tokens alone. slots (T,): the
        cache slots the tokens' K/V go to (default: their positions); a tree's siblings share a position but
        each needs a slot of its own. last_only: logits of the last position only (a prefill needs no more:
        (B, T, V) logits of a long or batched prompt cost gigabytes).
        Returns logits (B, T, V) and the final-norm hidden states h (B, T, dim)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if cache is not None and mask is None:  # causal over the cache: slot j is visible to position p if j <= p
            mask = torch.arange(cache.max_len, device=tokens.device) <= positions[:, None]
        x = self.tok_embeddings(tokens)
        # the rotation of every head of wqkv's output: q and k heads at their position, v heads at position 0,
        # whose rotation is the identity (cos 1, sin 0), so the k and v that the cache stores come out as one tensor
        a, T = self.args, tokens.shape[1]
        at = F.pad(positions[:, None].expand(T, a.n_heads + a.n_kv_heads), (0, a.n_kv_heads))  # (T, H + 2 Hkv)
        cos, sin = self.rope[at].unbind(-2)  # (T, H + 2 Hkv, D) each
        if mask is not None and mask.dtype == torch.bool:  # made additive once, not in every layer
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions if slots is None else slots, mask, cache, i)
        h = self.norm(x)
        return self.output(h[:, -1:] if last_only else h), h


class KVCache:
    """Static cache (gpt-fast style): one preallocated buffer, written at absolute positions and read through a
    mask, so rejected speculative tokens need no undo. Positions are shared by the batch."""

    def __init__(self, args, batch_size, max_len, device=None, dtype=torch.float32):
        # one buffer, k heads then v heads, as Attention's projection lays them out: one copy writes both
        Hkv = args.n_kv_heads
        self.kv = torch.zeros(args.n_layers, batch_size, 2 * Hkv, max_len, args.head_dim, device=device, dtype=dtype)
        self.k, self.v = self.kv[:, :, :Hkv], self.kv[:, :, Hkv:]  # views (n_layers, B, Hkv, L, D)
        self.max_len = max_len

    def update(self, layer, slots, kv):  # kv (B, 2 Hkv, T, D), k heads then v heads, goes to cache slots (T,)
        self.kv[layer].index_copy_(2, slots, kv)
        return self.kv[layer]  # (B, 2 Hkv, L, D)

    def rows(self, a, b):
        """A cache over batch rows a..b-1 of this one, sharing its memory (each layer's rows are one block)."""
        part = object.__new__(KVCache)
        part.kv, part.max_len, Hkv = self.kv[:, a:b], self.max_len, self.k.shape[2]
        part.k, part.v = part.kv[:, :, :Hkv], part.kv[:, :, Hkv:]
        return part

    def move(self, src, dst):
        """Copy slots src (LongTensor) to dst, dst+1, ... (keeps an accepted tree path, dropping the rest). dst is an
        int or a 0-d LongTensor on the device (then no host sync: CUDA graphs)."""
        slots = dst + torch.arange(src.numel(), device=src.device)
        self.kv.index_copy_(3, slots, self.kv.index_select(3, src))  # gather first: overlap is safe


class Graphed:
    """fn(*inputs) -> tensor(s), static shapes, no host syncs. compile: torch.compile fn first (inductor, `mode`; the
    first call compiles, and one line on stderr says how long that took). on=False: fn (or its compiled form),
    eagerly. on=True: the first call warms fn up and captures it in a CUDA graph; each call copies its inputs into
    the static buffers the graph reads, replays it and returns the static outputs, which the next replay (of any
    graph sharing the pool) overwrites: read them before the next call. The warm-up repeats fn's cache writes with
    the same inputs: harmless. A mode with CUDA graphs of its own (reduce-overhead) cannot be captured again.
    width: the index of an input that is the same tensor at every call, arange(W) for a step that attends over the
    first W cache slots. It is never copied, and torch.compile is asked to keep its length symbolic: the Graphed
    steps of one fn at every width then share one compiled program (and each has its own graph), unless a kernel
    needs the width fixed, in which case each width compiles its own (the same numbers, a longer warm-up)."""

    def __init__(self, fn, on, pool=None, compile=False, mode="max-autotune-no-cudagraphs", width=None):
        self.fn = torch.compile(fn, mode=mode, dynamic=None if width is not None else False) if compile else fn
        self.on, self.pool, self.graph, self.mode, self.compile_s = on, pool, None, mode if compile else None, None
        self.width = width

    def run(self, *inputs):  # self.fn, timing the first call when that call compiles it
        if self.mode is None or self.compile_s is not None:
            return self.fn(*inputs)
        from torch._dynamo.utils import counters
        if self.width is not None:  # (maybe: where a kernel needs the width fixed, it recompiles per width instead)
            torch._dynamo.maybe_mark_dynamic(inputs[self.width], 0)
        t0, programs = time.perf_counter(), counters["stats"]["unique_graphs"]
        out = self.fn(*inputs)
        if self.on:
            torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - t0
        if counters["stats"]["unique_graphs"] > programs:  # (a width after the first finds the program compiled)
            print(f"torch.compile (mode {self.mode}): first call {self.compile_s:.1f} s", file=sys.stderr, flush=True)
        return out

    def __call__(self, *inputs):
        if not self.on:
            return self.run(*inputs)
        if self.graph is None:
            # static input buffers: the graph reads these addresses
            self.inputs = [x if i == self.width else x.clone() for i, x in enumerate(inputs)]
            side = torch.cuda.Stream()  # warm up off the current stream (what torch.cuda.graph expects), so lazy
            side.wait_stream(torch.cuda.current_stream())  # inits (cuBLAS workspaces, ...) are not captured
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.run(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # the pool: graphs run one at a time and their outputs are read before the next replay, so they can
            # share one memory pool for their intermediates instead of holding one each
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.outputs = self.fn(*self.inputs)
        for i, (buf, x) in enumerate(zip(self.inputs, inputs)):
            if i != self.width:
                buf.copy_(x)
        self.graph.replay()
        return self.outputs


# -----------------------------------------------------------------------------
# loading Hugging Face-format directories: config.json + model.safetensors (or shards, or pytorch_model*.bin)

NAMES = [  # one row per weight: llama.cpp GGUF, Hugging Face, ours; {i} is the layer index; all end in ".weight".
    # Rows sharing our name are concatenated along the rows, in this order (q|k|v and gate|up: fused projections)
    ("token_embd", "model.embed_tokens", "tok_embeddings"),
    ("blk.{i}.attn_q", "model.layers.{i}.self_attn.q_proj", "layers.{i}.attention.wqkv"),
    ("blk.{i}.attn_k", "model.layers.{i}.self_attn.k_proj", "layers.{i}.attention.wqkv"),
    ("blk.{i}.attn_v", "model.layers.{i}.self_attn.v_proj", "layers.{i}.attention.wqkv"),
    ("blk.{i}.attn_output", "model.layers.{i}.self_attn.o_proj", "layers.{i}.attention.wo"),
    ("blk.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj", "layers.{i}.feed_forward.w13"),
    ("blk.{i}.ffn_up", "model.layers.{i}.mlp.up_proj", "layers.{i}.feed_forward.w13"),
    ("blk.{i}.ffn_down", "model.layers.{i}.mlp.down_proj", "layers.{i}.feed_forward.w2"),
    ("blk.{i}.attn_norm", "model.layers.{i}.input_layernorm", "layers.{i}.attention_norm"),
    ("blk.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm", "layers.{i}.ffn_norm"),
    ("output_norm", "model.norm", "norm"),
    ("output", "lm_head", "output"),
]


def name_map(src, dst, n_layers, tied):
    """{name in column src: name in column dst} (0 GGUF, 1 HF, 2 ours), spelled out for every layer."""
    rows = [r for r in NAMES if not (tied and r[2] == "output")]  # tied: the head is the embedding
    return {r[src].format(i=i) + ".weight": r[dst].format(i=i) + ".weight" for i in range(n_layers) for r in rows}


def model_args_from_config(cfg, where):
    arch, kind = (cfg.get("architectures") or ["LlamaForCausalLM"])[0], cfg.get("model_type")  # may be unnamed
    if kind != "llama" or arch != "LlamaForCausalLM":
        raise BeagleError(f"{where} holds a {arch} model (model_type {kind!r}); Beagle targets the Llama family "
                          "(LlamaForCausalLM: Llama-2/3, Vicuna, TinyLlama, SmolLM2)")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise BeagleError(f"{where}: Llama variants with biases or a non-SiLU activation are not supported")
    rope = cfg.get("rope_parameters") or {}  # transformers 5 keeps rope_theta and rope_type here
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("default", "llama3", "linear"):
        raise BeagleError(f"{where}: rope scaling {scaling} is not supported (only llama3 and linear)")
    try:
        return ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                         n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         head_dim=cfg.get("head_dim") or 0, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=scaling,
                         max_seq_len=cfg.get("max_position_embeddings", 2048),
                         tie_embeddings=cfg.get("tie_word_embeddings", False))
    except KeyError as e:
        raise BeagleError(f"{where}/config.json lacks {e.args[0]}") from None


def weight_files(path):
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).exists():
            shards = sorted(set(read_json(path / index).get("weight_map", {}).values()))
            for shard in shards:
                if not (path / shard).exists():
                    raise BeagleError(f"{path}: shard {shard} listed in {index} is missing")
            return [path / s for s in shards]
        if (path / single).exists():
            return [path / single]
    raise BeagleError(f"{path} has no model.safetensors, pytorch_model.bin or their .index.json")


def read_tensors(file):  # yields (name, tensor) one at a time: only one tensor beyond the model is in memory
    try:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
    except Exception as e:  # safetensors, pickle and zip errors all mean the same thing to the user
        raise BeagleError(f"cannot read {file} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_hf(path, device="cpu", dtype=torch.float32):
    """An HF-format Llama directory -> our Transformer, built on the meta device and filled in place."""
    path = Path(path)
    if not path.is_dir():
        raise BeagleError(f"{path}: no such model directory")
    args = model_args_from_config(read_json(path / "config.json"), path)
    with torch.device("meta"):  # no memory: a 7B model must never exist twice
        model = Transformer(args)
    names = name_map(1, 2, args.n_layers, args.tie_embeddings)  # HF -> ours
    # the shape of each HF tensor: ours, or for a part of a fused matrix (NAMES) its share of the rows
    a, shapes = args, {k: v.shape for k, v in model.state_dict().items()}
    share = {"q_proj": a.n_heads * a.head_dim, "k_proj": a.n_kv_heads * a.head_dim, "v_proj": a.n_kv_heads * a.head_dim,
             "gate_proj": a.hidden_dim, "up_proj": a.hidden_dim}
    want = {hf: (share[hf.split(".")[-2]], shapes[ours][1]) if hf.split(".")[-2] in share else shapes[ours]
            for hf, ours in names.items()}
    parts = {}
    for file in weight_files(path):
        for hf, t in read_tensors(file):
            if hf not in names:
                if hf.endswith("rotary_emb.inv_freq") or hf == "lm_head.weight":  # an old buffer / a tied copy
                    continue
                raise BeagleError(f"{file}: unexpected tensor {hf} (not a plain Llama checkpoint)")
            if t.shape != want[hf]:
                raise BeagleError(f"{file}: tensor {hf} has shape {tuple(t.shape)} but config.json implies "
                                  f"{tuple(want[hf])}")
            parts[hf] = t.to(device=device, dtype=dtype)
    missing = [hf for hf in names if hf not in parts]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BeagleError(f"{path}: missing tensor {missing[0]}{more}")
    state = {}
    for hf, ours in names.items():  # in NAMES order: q, k, v and gate, up
        state.setdefault(ours, []).append(parts.pop(hf))
    for ours, ts in state.items():  # one fused matrix at a time, its parts freed as it is built
        state[ours] = torch.cat(ts) if len(ts) > 1 else ts[0]
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = rope_table(args, args.max_seq_len).to(device, dtype)  # non-persistent buffer: still on meta
    return model.eval()
