"""
The Beagle draft: one cross-attention decoder layer (Zhong et al., "Cross-Attention Speculative Decoding",
arXiv 2505.24544), its training masks, and its checkpoint format; and EAGLE-2's draft, the baseline it is
compared with (Li et al., arXiv 2401.15077 and 2406.16858), behind the same small interface.

    python train.py --stage 1 --data sharegpt.jsonl --out runs/s1            # trains it (see train.py)
    python decode.py --draft runs/s1/draft.safetensors ...                   # uses it (see decode.py)
    python beagle.py --draft runs/s2/draft.safetensors --out drafts/x.safetensors  # a bf16 copy to ship

Queries come from the target's token embeddings e(t_i), keys/values from the target's top-layer states h_j
(and, while drafting, from the draft's own states); the embedding and the LM head are the target's, frozen and
shared, and are never stored in the draft checkpoint:

    y_i     = Attn(q = norm(e(t_i)), k/v = norm(h_j) for visible j) + e(t_i)
    hat_h_i = FFN(norm(y_i)) + y_i          # the draft's estimate of h_i; logits = target.output(hat_h_i)

Choices the paper leaves open, and how we make them:
- h is the target state AFTER its final RMSNorm (what the LM head reads, as in EAGLE); llama.py returns that.
- A query with no visible key (position 0, the partial window before the first full one) gets attention
  output 0: we unmask one dummy key so SDPA never sees an all-False row (no NaN forward or backward) and zero
  the result, so hat_h = FFN(norm(e)) + e. train.py gives such positions no loss: a position is trained only
  when it sees at least one TRUE target state, as every query does when drafting after a prompt.
- RoPE: queries at their own absolute positions, every key (true state or draft state) at the absolute
  position of the token it belongs to, so a draft state is the exact stand-in for the true state it estimates.
- Window positions are 1-based; the positions before `offset` form a partial window starting at 0 (they see
  no true key, so they carry no loss).
- VOCAB: a checkpoint may carry `vocab`, every token id of the target ranked by how often the target wrote it in
  the training data (train.py stores it). decode.py --draft-vocab N lets the draft propose only the N most
  frequent tokens: its LM head then reads N rows instead of the whole vocabulary (FR-Spec's idea), which matters
  on a CPU, where one full-vocabulary head costs a fifth of a SmolLM2-135M forward. Still lossless: the target
  checks every token.
- Init: every linear weight ~ N(0, 0.02), wo and w2 (the two projections that write into the residual)
  ~ N(0, 0.02 / sqrt(2)), norms at 1 (nanoGPT's rule for one layer): hat_h starts close to e(t_i) + small.

EAGLE-2's draft (class Eagle2) is one SELF-attention decoder layer over fused inputs
    x_i = FC([e(t_i); h_{i-1}])             # 2 dim -> dim, with a bias; h_{-1} does not exist: no x_0
    hat_h_i = Layer(x over x_1..x_i)        # causal self-attention (no input norm, as EAGLE's one layer has), FFN
so its keys come from its inputs (which carry the previous state), where Beagle's come from states themselves.
It trains next-token only (--window 1, stage 1), with the same loss: soft cross-entropy + 10 x smooth-L1 on the
states, noise on the input states.

The draft interface: what train.py and decode.py call, so a third draft implements exactly these:
- forward(emb, positions, states, positions, mask): training, all T positions at once. emb (B, T, dim) = e(t_i),
  states (B, T, dim) the (noised) target states h_i, mask (1, 1, T, T) which states each query may use (for
  Beagle: which keys it sees). -> hat_h (B, T, dim). Beagle's stage 2 also calls kv() and attend() directly.
- commit(cache, start, h, emb_next): decoding, the TRUE target states h (1, S, dim) of positions start..start+S-1
  are final; emb_next (1, S-1, dim) are the embeddings of the tokens at start+1..start+S-1. Writes the cache.
- propose(cache, start, positions, emb, parent, mask): decoding, R tree nodes query at once. emb (1, R, dim) their
  tokens' embeddings at positions (R,), parent (1, R, dim) the draft state of each node's parent (None: the
  parent is the last committed token, whose true state the cache knows), mask (R|1, W) which of the first W
  cache slots (W <= L: what the step attends over) each node sees, the prefix and its ancestors. The R queries own
  scratch slots start..start+R-1 (< W), which a later commit overwrites. -> hat_h (1, R, dim).
- top(target, hat, k) and set_vocab: the head (shared, below). The cache (DraftCache) is a static key and
  value buffer per slot plus `last`, the newest true state: Beagle's slot p holds the K/V of the state at p,
  EAGLE-2's those of its fused input x_p.
"""
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
from common import DTYPES, BeagleError, check_output, cli, write_atomic
from llama import FeedForward, Linear, RMSNorm, apply_rope, linear, rope_table


@dataclass
class DraftArgs:
    dim: int = 576
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    vocab_size: int = 49152  # the target's; the draft has no vocabulary weights of its own
    max_seq_len: int = 2048  # the target's: the positions RoPE has a table for

    @classmethod
    def from_target(cls, args):  # the draft layer has the shape of one target layer
        return cls(dim=args.dim, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, head_dim=args.head_dim,
                   hidden_dim=args.hidden_dim, norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                   rope_scaling=args.rope_scaling, vocab_size=args.vocab_size, max_seq_len=args.max_seq_len)


class Beagle(nn.Module):
    kind = "beagle"  # what a checkpoint's "draft" metadata calls it (DRAFTS)
    vocab = None  # (V,) LongTensor: the target's tokens ranked by frequency in the training data (VOCAB), or None
    head = None  # what the draft proposes from: None = every token, or (ids (N,), their LM-head rows (N, dim))

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.query_norm = RMSNorm(args.dim, args.norm_eps)  # on e(t)
        self.kv_norm = RMSNorm(args.dim, args.norm_eps)  # on target (or draft) states
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wkv = Linear(args.dim, 2 * args.n_kv_heads * args.head_dim, bias=False)  # rows of k, then v
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.register_buffer("rope", rope_table(args, args.max_seq_len), persistent=False)  # cast with the draft
        for name, p in self.named_parameters():
            if p.dim() == 2:  # linears; residual-writing projections scaled down (see module docstring)
                std = 0.02 / math.sqrt(2) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def kv(self, states, positions):
        """states (B, S, dim) at absolute positions (S,) -> k, v (B, Hkv, S, D), RoPE applied to k."""
        B, S, _ = states.shape
        kv = self.wkv(self.kv_norm(states)).view(B, S, 2 * self.n_kv_heads, self.head_dim)
        k, v = kv.chunk(2, dim=2)  # (B, S, Hkv, D) each
        cos, sin = self.rope[positions, None].to(k.dtype).unbind(-2)  # (S, 1, D); .to: for autocast
        return apply_rope(k, cos, sin).transpose(1, 2), v.transpose(1, 2)

    def attend(self, emb, positions, k, v, mask):
        """emb (B, T, dim) = target.tok_embeddings(query tokens) at positions (T,); k, v (B, Hkv, S, D);
        mask bool (B|1, 1, T, S), True = may attend. Returns hat_h (B, T, dim)."""
        B, T, _ = emb.shape
        q = self.wq(self.query_norm(emb)).view(B, T, self.n_heads, self.head_dim)
        cos, sin = self.rope[positions, None].to(q.dtype).unbind(-2)  # (T, 1, D)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, T, D)
        if k.shape[2] == 0:  # no keys at all: every row is a no-visible-key row
            y = torch.zeros_like(q)
        else:
            seen = mask.any(-1, keepdim=True)  # (B|1, 1, T, 1): rows with at least one visible key
            # An all-False row makes SDPA's softmax 0/0 = NaN (forward and backward): let such rows see key 0
            # and zero their output below, so they get exactly 0 and no gradient flows through them.
            first = torch.zeros_like(mask[..., :1, :])  # (.., 1, S)
            first[..., 0].fill_(True)  # (not `= True`: that copies a host scalar, a GPU sync)
            mask = mask | (first & ~seen)
            y = torch.where(seen, llama.attention(q, k, v, mask), 0.0)  # (B, H, T, D)
        y = self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)) + emb  # (T may be 0)
        return self.feed_forward(self.ffn_norm(y)) + y

    def forward(self, emb, q_positions, states, k_positions, mask):
        return self.attend(emb, q_positions, *self.kv(states, k_positions), mask)

    # decoding (the interface in the module docstring)

    def commit(self, cache, start, h, emb_next):
        cache.write(start, *self.kv(h, start + torch.arange(h.shape[1], device=h.device)))

    def propose(self, cache, start, positions, emb, parent, mask):
        W = mask.shape[-1]  # the slots the queries may see lie in the first W
        hat = self.attend(emb, positions, cache.k[:, :, :W], cache.v[:, :, :W], mask[None, None])
        cache.write(start, *self.kv(hat, positions))  # children will see these states as keys
        return hat

    # the draft's head: the target's LM head, or its rows of the n most frequent tokens only (VOCAB)

    def set_vocab(self, target, n, explicit=True):
        """Propose from the n most frequent target tokens (self.vocab's ranking); n = 0 or >= V: from all of them,
        as also for a draft without a ranking when n was not asked for explicitly."""
        self.head = None
        if n < 0:
            raise BeagleError(f"--draft-vocab must be >= 0, not {n}")
        if n == 0 or n >= target.args.vocab_size:
            return
        if self.vocab is None:
            if explicit:
                raise BeagleError("--draft-vocab needs a draft with a token ranking (train.py stores one; for older "
                                  "drafts: python beagle.py --draft D --out D2 --vocab-data DATA)")
            return
        ids = self.vocab[:n].to(target.output.weight.device)
        self.head = ids, target.output.weight[ids].contiguous()

    def vocab_size(self):  # how many tokens the draft proposes from
        return self.args.vocab_size if self.head is None else len(self.head[0])

    def check_top_k(self, k):
        if not 0 < k <= self.vocab_size():
            raise BeagleError(f"--top-k {k} must be in [1, {self.vocab_size()}], the draft's vocabulary"
                              + ("" if self.head is None else " (--draft-vocab)"))

    def top(self, target, hat, k):
        """hat (R, dim) draft states -> the k best next tokens of each row: (log-probs (R, k) fp32, ids (R, k)).
        With a subset the softmax is over its tokens: only the ranking of candidates matters."""
        if self.head is None:
            top = F.log_softmax(target.output(hat).float(), -1).topk(k)
            return top.values, top.indices
        ids, weight = self.head
        top = F.log_softmax(linear(hat, weight).float(), -1).topk(k)
        return top.values, ids[top.indices]


class Eagle2(Beagle):
    """EAGLE-2's draft (module docstring): Beagle's layer with its two input norms removed, keys and values from
    the layer's own inputs, and an FC that fuses each token's embedding with the previous position's state."""
    kind = "eagle2"

    def __init__(self, args):
        super().__init__(args)
        self.query_norm = self.kv_norm = nn.Identity()  # q, k and v all read the fused input x as it is
        self.fc = Linear(2 * args.dim, args.dim, bias=True)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.02), nn.init.zeros_(self.fc.bias)

    def fuse(self, emb, prev):  # (B, T, dim) each -> x (B, T, dim)
        return self.fc(torch.cat([emb, prev], -1))

    def forward(self, emb, q_positions, states, k_positions, mask):
        # x_p reads the state at p-1, so key x_p is visible exactly when state p-1 is: the mask moves one column
        # right (and x_0, which would read a state before the sequence, is never a key)
        x = self.fuse(emb, torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], 1))
        keys = torch.cat([torch.zeros_like(mask[..., :1]), mask[..., :-1]], -1)
        return self.attend(x, q_positions, *self.kv(x, k_positions), keys)

    def commit(self, cache, start, h, emb_next):
        S = h.shape[1]
        x = self.fuse(emb_next, h[:, :-1])  # x at start+1 .. start+S-1
        cache.write(start + 1, *self.kv(x, start + 1 + torch.arange(S - 1, device=h.device)))
        cache.last.copy_(h[:, -1:])  # the next root's query reads it

    def propose(self, cache, start, positions, emb, parent, mask):
        x = self.fuse(emb, cache.last.expand_as(emb) if parent is None else parent)
        cache.write(start, *self.kv(x, positions))  # a query sees its own input: write it first
        W = mask.shape[-1]  # the slots the queries may see lie in the first W
        slot = torch.arange(W, device=x.device)
        own = slot[None, :] == (start + torch.arange(x.shape[1], device=x.device))[:, None]  # (R, W)
        return self.attend(x, positions, cache.k[:, :, :W], cache.v[:, :, :W], ((mask & (slot > 0)) | own)[None, None])


DRAFTS = {cls.kind: cls for cls in (Beagle, Eagle2)}  # a checkpoint's "draft" metadata -> its class


class DraftCache:
    """A draft's decoding cache (the interface above): static K/V buffers (1, Hkv, L, D) and `last` (1, 1, dim), the
    true state of the newest committed token (what an EAGLE-2 root query reads). Slots 0..n-1 hold the K/V of the
    committed prefix, made from TRUE target states; while drafting, the queries' own K/V go to the scratch slots
    n, n+1, ..., which the next iteration's commit overwrites (so drafts are discarded for free)."""

    def __init__(self, draft, max_len):
        w = next(draft.parameters())
        self.k = w.new_zeros(1, draft.n_kv_heads, max_len, draft.head_dim)
        self.v = torch.zeros_like(self.k)
        self.last = w.new_zeros(1, 1, draft.args.dim)

    def write(self, start, k, v):  # k, v (1, Hkv, S, D) -> slots start .. start+S-1 (start: int or (1,) tensor)
        slots = start + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)


# -----------------------------------------------------------------------------
# masks (True = may attend). One sequence is cut into windows of `window` positions; the first full window
# starts at `offset` (0 <= offset < window) and positions 0..offset-1 form a partial window starting at 0.

def window_start(seq_len, window, offset, device=None):
    """(seq_len,) first position of each position's window."""
    assert 0 <= offset < window, f"offset {offset} must be in [0, {window})"
    i = torch.arange(seq_len, device=device)
    return torch.where(i < offset, 0, i - (i - offset) % window)


def window_positions(seq_len, window, offset, device=None):
    """(seq_len,) 1-based position of each position inside its window (the draft step it simulates)."""
    i = torch.arange(seq_len, device=device)
    return i - window_start(seq_len, window, offset, device) + 1


def block_mask(seq_len, window, offset, device=None):
    """Stage 1, inverse block attention: (seq_len, seq_len), query i sees key j iff j < start of i's window,
    so window position p drafts p steps ahead of the last true state it sees."""
    start = window_start(seq_len, window, offset, device)
    return torch.arange(seq_len, device=device)[None, :] < start[:, None]


def simulation_mask(seq_len, window, offset, step, device=None):
    """Stage 2, simulation step `step` (1-based): (seq_len, 2 * seq_len) over [true keys | draft-state keys].
    The true half is the block mask; a query at window position p >= step also sees the draft states at window
    positions 1..step-1 of its own window (the states the draft would have produced itself by then)."""
    start = window_start(seq_len, window, offset, device)
    pos = window_positions(seq_len, window, offset, device)
    same_window = start[:, None] == start[None, :]  # (T, T)
    draft = same_window & (pos[None, :] < step) & (pos[:, None] >= step)
    return torch.cat([block_mask(seq_len, window, offset, device), draft], dim=1)


# -----------------------------------------------------------------------------
# checkpoint: safetensors with the draft config and a fingerprint of the target in the metadata

FORMAT = "beagle-draft-v1"


def target_fingerprint(target):
    """Shape of the target plus a dtype-robust signature of its embedding: the L2 norms (computed in fp32) of 16
    fixed rows. Norms average the rounding of single weights out, so the same target in bf16, fp16 and fp32
    agrees to ~1e-4 relative, while another target differs by far more. Compared with a tolerance, not hashed:
    an exact hash of rounded numbers flips whenever a number sits next to a rounding boundary."""
    a, emb = target.args, target.tok_embeddings.weight
    rows = torch.linspace(0, a.vocab_size - 1, 16).long().to(emb.device)
    norms = emb.detach()[rows].float().norm(dim=-1)
    return {"dim": a.dim, "n_layers": a.n_layers, "vocab_size": a.vocab_size, "n_heads": a.n_heads,
            "n_kv_heads": a.n_kv_heads, "embedding_norms": [round(x, 6) for x in norms.tolist()]}


def check_fingerprint(saved, target, rtol=5e-3):
    now = target_fingerprint(target)
    for key in ("dim", "n_layers", "vocab_size", "n_heads", "n_kv_heads"):
        if saved.get(key) != now[key]:
            raise BeagleError(f"draft was trained for another target: {key} {saved.get(key)} vs {now[key]}")
    a, b = torch.tensor(saved["embedding_norms"]), torch.tensor(now["embedding_norms"])
    if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=1e-6):
        raise BeagleError("draft was trained for another target: same shape, different embedding weights")


def save_draft(path, draft, target, extra=None):
    """Atomic: write a temp file next to `path`, then os.replace, so a crash never leaves half a checkpoint."""
    meta = {"format": FORMAT, "draft": draft.kind, "draft_args": json.dumps(asdict(draft.args)),
            "target": json.dumps(target_fingerprint(target)), "extra": json.dumps(extra or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}
    if getattr(draft, "vocab", None) is not None:
        tensors["vocab"] = draft.vocab.to(torch.int32).cpu()
    write_safetensors(path, tensors, meta)


def write_safetensors(path, tensors, meta):
    from safetensors.torch import save_file
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


OLD_NAMES = {"wkv.weight": ("wk.weight", "wv.weight"),  # drafts saved before the projections were fused
             "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight")}


def read_draft(path):
    """-> (tensors, metadata) with BeagleError one-liners for everything a user can get wrong. Old checkpoints get
    their separate projections concatenated into the fused ones (OLD_NAMES), so everything reads one format."""
    from safetensors import safe_open
    if os.path.isdir(path):  # (a training run's directory: its draft is a file in it)
        raise BeagleError(f"{path} is a directory; give a draft checkpoint, e.g. "
                          f"{os.path.join(path, 'draft.safetensors')}")
    if not os.path.isfile(path):
        raise BeagleError(f"no draft checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise BeagleError(f"cannot read draft checkpoint {path} (corrupt or not safetensors): {e}") from None
    if meta.get("format") != FORMAT:
        raise BeagleError(f"{path} is not a Beagle draft checkpoint (no '{FORMAT}' metadata)")
    for new, old in OLD_NAMES.items():
        if new not in tensors and all(name in tensors for name in old):
            tensors[new] = torch.cat([tensors.pop(name) for name in old])
    return tensors, meta


def load_draft(path, target, device="cpu", dtype=torch.float32):
    tensors, meta = read_draft(path)
    try:
        args, saved = json.loads(meta["draft_args"]), json.loads(meta["target"])
        args = DraftArgs(**{"max_seq_len": target.args.max_seq_len, **args})  # (older drafts do not store it)
    except Exception as e:
        raise BeagleError(f"{path}: unreadable draft metadata: {e}") from None
    check_fingerprint(saved, target)
    kind = meta.get("draft", "beagle")  # (drafts saved before EAGLE-2 came have no "draft": Beagle's)
    if kind not in DRAFTS:
        raise BeagleError(f"{path}: unknown draft kind {kind!r} (known: {', '.join(DRAFTS)})")
    draft = DRAFTS[kind](args)
    vocab = tensors.pop("vocab", None)
    if vocab is not None and vocab.shape != (args.vocab_size,):
        raise BeagleError(f"{path}: its token ranking has shape {tuple(vocab.shape)}, not ({args.vocab_size},)")
    try:
        draft.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise BeagleError(f"{path}: weights do not match its own config: {str(e).splitlines()[0]}") from None
    draft = draft.to(device=device, dtype=dtype).eval()  # the RoPE table too, rounded from fp32 as HF does
    draft.vocab = None if vocab is None else vocab.long().to(device)  # see VOCAB in the module docstring
    return draft


@dataclass
class ExportConfig:
    draft: str = "runs/s2/draft.safetensors"  # a checkpoint written by train.py (fp32 master weights)
    out: str = "drafts/smollm2-135m-instruct.safetensors"  # the file written; the default: where decode.py looks
    dtype: str = "bfloat16"  # the weights' dtype in the copy: bfloat16 | float16 | float32 (or bf16, fp16, fp32)
    # (re)compute the token ranking (VOCAB above) from this training data, read with the target's tokenizer; for
    # checkpoints written before train.py stored the ranking
    vocab_data: str | None = None
    target: str | None = None  # the tokenizer of --vocab-data: HF-format directory or .gguf; None: default SmolLM2


def export_draft(src, dst, dtype=torch.bfloat16, vocab=None):
    """A copy of a draft checkpoint with its weights cast to dtype (same config, fingerprint and metadata) and, if
    given, a new token ranking, written atomically. Drafts are loaded in the decoding dtype anyway, so bf16 loses
    nothing on a bf16 GPU."""
    tensors, meta = read_draft(src)
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    if vocab is not None:
        tensors["vocab"] = vocab.to(torch.int32)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    write_safetensors(dst, tensors, meta)


if __name__ == "__main__":
    cfg = cli(ExportConfig)
    try:
        if cfg.dtype not in DTYPES:
            raise BeagleError(f"--dtype must be one of {', '.join(DTYPES)} (got {cfg.dtype!r})")
        check_output(cfg.out, "--out")  # before the ranking's minutes of tokenizing
        if os.path.isfile(cfg.out) and os.path.getsize(cfg.out):  # replaced only if it is a draft too
            try:
                read_draft(cfg.out)
            except BeagleError:
                raise BeagleError(f"--out {cfg.out} exists and is not a draft checkpoint: give a new file "
                                  "name") from None
        read_draft(cfg.draft)  # (likewise a wrong --draft)
        vocab = None
        if cfg.vocab_data:
            import data
            from convert import load_target
            convs = data.load_conversations(cfg.vocab_data)  # (a wrong path: an error before the target loads)
            target, tok = load_target(cfg.target)
            examples = data.tokenize_all(tok, convs, 2048)
            vocab = data.token_ranking(examples, target.args.vocab_size)
        export_draft(cfg.draft, cfg.out, DTYPES[cfg.dtype], vocab)
        print(f"{cfg.draft} -> {cfg.out} ({cfg.dtype}, {os.path.getsize(cfg.out) / 2**20:.1f} MiB)")
    except BeagleError as e:
        sys.exit(f"error: {e}")
