"""
The target: a from-scratch Llama-family model (Llama-2/3, Vicuna, TinyLlama, SmolLM2), its static KV cache,
and its loaders.

    python llama.py --convert FILE.gguf --out DIR     # llama-architecture GGUF -> HF-format directory

The weights use the Hugging Face layout (q/k rows ordered for `rotate_half` RoPE), so an HF checkpoint loads
with one literal name map and no permutation. `forward` returns the logits and the top-layer hidden states
*after* the final RMSNorm (what the LM head reads): those are the states the Beagle draft attends to.
"""
import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


class BeagleError(Exception):
    """A user-facing problem (bad checkpoint, wrong target, prompt too long...): scripts print it as one line."""


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
    rope_scaling: dict | None = None  # HF's dict; only rope_type "llama3" changes anything
    max_seq_len: int = 2048  # the context the model was trained for
    tie_embeddings: bool = False

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.n_heads


# -----------------------------------------------------------------------------
# a small CLI over a dataclass, shared by every script: --key value / --key=value, typed by the field

def cli(config_cls, argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    kwargs, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            sys.exit(f"error: unexpected argument {arg!r} (options look like --key value)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            sys.exit(f"error: unknown option --{key.replace('_', '-')}; known: "
                     + " ".join("--" + k.replace("_", "-") for k in fields))
        kind = str(fields[key].type)
        if not eq:  # a bare --flag is True for booleans, else the value is the next argument
            if "bool" in kind and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                sys.exit(f"error: option --{key} needs a value")
        kwargs[key] = _coerce(key, value, kind)
        i += 1
    return config_cls(**kwargs)


def _coerce(key, value, kind):
    if value.lower() == "none" and "None" in kind:
        return None
    try:
        if "bool" in kind:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
    except ValueError:
        sys.exit(f"error: --{key} expects {kind}, got {value!r}")
    return value


# -----------------------------------------------------------------------------
# model

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, as the reference implementations do
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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
    elif sc.get("rope_type", sc.get("type", "default")) != "default":
        raise ValueError(f"unsupported rope_scaling {sc}")
    return inv_freq


def rope(inv_freq, positions, dtype):
    """cos, sin of shape (T, head_dim) for integer positions (T,)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2), fp32 as in HF
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, D); HF's rotate_half convention
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Static cache (gpt-fast style): one preallocated buffer per layer, written at absolute positions and
    read through a mask, so rejected speculative tokens need no undo. Positions are shared by the batch."""

    def __init__(self, args, batch_size, max_len, device=None, dtype=torch.float32):
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer, positions, k, v):  # k, v (B, Hkv, T, D) go to slots `positions` (T,)
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]

    def move(self, src, dst):
        """Copy slots src (LongTensor) to dst, dst+1, ... (keeps an accepted tree path, dropping the rest)."""
        n = src.numel()
        self.k[:, :, :, dst:dst + n] = self.k[:, :, :, src]  # advanced indexing gathers first: overlap is safe
        self.v[:, :, :, dst:dst + n] = self.v[:, :, :, src]


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, positions, mask, cache, layer):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)
            if mask is not None:  # the mask's width says how much of the cache is live
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, positions, mask, cache, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)

    def forward(self, tokens, positions=None, cache=None, mask=None):
        """tokens (B, T); positions (T,) absolute, shared by the batch (default 0..T-1); mask bool, True =
        may attend, broadcastable to (B, H, T, S) where S is T without a cache and the number of live cache
        slots with one. No mask means plain causal attention over this call's tokens alone.
        Returns logits (B, T, V) and the final-norm hidden states h (B, T, dim)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        if cache is not None and mask is None:  # causal over the cache: slot j is visible to position p if j <= p
            mask = torch.arange(cache.max_len, device=tokens.device) <= positions[:, None]
        x = self.tok_embeddings(tokens)
        cos, sin = rope(self.inv_freq, positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, positions, mask, cache, i)
        h = self.norm(x)
        return self.output(h), h
