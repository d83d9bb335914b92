"""
Plain and speculative decoding with a Beagle (or EAGLE-2) draft, batch size 1.

    python decode.py --prompt "Write a haiku about dogs."                      # EAGLE-2 dynamic tree, default draft
    python decode.py --prompt "Write a haiku about dogs." --mode ar            # plain decoding (the baseline)
    python decode.py --prompt-file prompts.jsonl --mode chain --depth 4 --json # one JSON object per prompt
    python decode.py --prompt "Hi" --compare                                   # + plain decoding, speedup, identical?
    python decode.py --prompt "Hi" --temperature 0.7 --top-p 0.9 --seed 1      # lossless speculative sampling
    python decode.py --bench mtbench --bench-limit 10 --bench-out runs/bench   # MT-bench, plain vs speculative
    python decode.py --prompt "Hi" --device cuda --compile false               # CUDA graphs without torch.compile
    python decode.py --prompt "Hi" --compare --draft eagle2                    # the EAGLE-2 baseline's draft

One speculative iteration. The committed prefix t_0..t_{n-1} has true target states h_0..h_{n-1}, whose draft
keys/values sit in the draft cache. The bonus token t_n (the target's own choice after the prefix) roots a tree:
  1. draft: the root queries e(t_n) at position n over the true keys and proposes its top-k children; each
     further step expands the top-k frontier nodes (by cumulative draft log-prob), a node's query seeing the true
     keys plus the draft states hat_h of its ancestors only (each step's queries write their K/V, batched, to
     scratch slots that the next iteration overwrites). Keep the best --tree-tokens nodes by cumulative log-prob.
     The draft is either beagle.py's (Beagle, or the EAGLE-2 baseline): both implement commit() and propose().
  2. verify: root + nodes in ONE target forward, tree attention mask over the cache, position = n + depth.
  3. accept the longest path the target agrees with (argmax at temperature 0, else sequential rejection sampling:
     exactly the target's distribution) plus one bonus token from the target; move the path's K/V into place;
     write the path's true states into the draft cache. --mode chain: the same tree with top-k 1.

One static path on every device: the caches have one size (--max-len slots) whatever the prompt, the prefix length n
lives on the device, slots past the prefix are masked out (rejected tokens need no undo), and random numbers are
drawn before a step and passed in. A step (a plain token: generate.py's engine at batch 1; or a whole iteration) is
a fixed sequence of kernels that reads nothing back to the host; its result is read once after it. It attends over
the first W slots, the prefix and one tree rounded up to a multiple of WIDTH, so it reads few dead slots: one step
per width, captured once as a CUDA graph on a GPU (llama.Graphed, torch.compile'd first by default: one program for
all widths, minutes to compile on a machine's first run, then cached) and replayed; on the CPU the same steps run
eagerly. The CPU's tree shape and draft vocabulary fit the machine: calibrate.py times it once and chooses them.
"""
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import beagle
import common
import convert
import generate
import llama
from beagle import DraftCache
from common import DTYPES, BeagleError, is_text, short
from llama import Graphed, KVCache

DEFAULT_DRAFT = Path(__file__).resolve().parent / "drafts" / "smollm2-135m-instruct.safetensors"
SHIPPED = {"beagle": DEFAULT_DRAFT, "eagle2": DEFAULT_DRAFT.with_name("smollm2-135m-instruct-eagle2.safetensors")}
# (depth, top-k, tree tokens). GPU: the best shapes of a measured sweep (results/README.md), greedy and sampled
GPU_TREE = (4, 10, 60)
GPU_TREE_SAMPLED = (3, 6, 20)
# CPU: chosen per machine (calibrate.py); CPU_TREE where nothing is measured (train.py's tau; results/README.md)
CPU_TREE = (2, 2, 3)
CPU_DRAFT_VOCAB = 4096  # the subset the CPU may take (beagle.py, VOCAB); GPU: the whole vocabulary (its head is cheap)
MAX_LEN = {"cuda": 2048, "cpu": 1024}  # default cache slots (a step attends over the live ones: WIDTH)


@dataclass
class DecodeConfig:
    prompt: str | None = None  # one user turn to answer (non-blank UTF-8 text)
    # a file of prompts: .jsonl ({"prompt": "..."} or {"turns": ["...", ...]}, maybe "category", one per line) or
    # plain text, one prompt per line; blank lines are skipped
    prompt_file: str | None = None
    target: str | None = None  # HF-format directory or .gguf; None: the default SmolLM2-135M-Instruct
    # a draft checkpoint (train.py, beagle.py), or beagle | eagle2: the default target's shipped Beagle draft or
    # EAGLE-2 baseline (drafts/); None: the shipped Beagle draft for the default target (no draft: plain decoding)
    draft: str | None = None
    mode: str = "tree"  # ar | chain | tree: plain decoding, a chain of --depth draft tokens, an EAGLE-2 dynamic tree
    # chosen by device: GPU 4 / 10 / 60 (sampling 3 / 6 / 20) and all tokens; CPU: for this machine's costs, measured
    # on first use (a few seconds, then cached; calibrate.py), or plain decoding where no tree is predicted to pay
    depth: int = 0  # draft steps per iteration, >= 1; 0: by device (GPU 4, sampled 3; CPU by machine)
    top_k: int = 0  # children per expanded node (tree), >= 1; 0: by device (GPU 10, sampled 6; CPU by machine)
    tree_tokens: int = 0  # draft tokens verified per iteration (tree), >= 1; 0: by device (GPU 60, sampled 20; CPU)
    # N > 0: the draft proposes from the N most frequent target tokens; 0: all; -1: chosen by device (GPU all, CPU per
    # machine: 4096 or all)
    draft_vocab: int = -1
    max_new_tokens: int = 256  # the longest answer, in tokens, >= 1
    # cache slots of an answer (prompt + answer + one tree), at most the target's context; 0: chosen by device
    # (GPU 2048, CPU 1024)
    max_len: int = 0
    temperature: float = 0.0  # >= 0, finite; 0: exact argmax (greedy)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much mass, in (0, 1]; 1: off
    top_k_sample: int = 0  # sample from the k most likely tokens, >= 0; 0: no top-k filter
    seed: int = 0  # the sampling generator's seed, in [0, 2^32) (each answer starts from it)
    json: bool = False  # one JSON object per answer on stdout instead of streamed text
    compare: bool = False  # also decode plainly: speedup, and whether the tokens are identical
    bench: str | None = None  # benchmark plain vs speculative decoding: mtbench | FILE.jsonl ({"turns": [...]})
    bench_limit: int = 0  # N > 0: N questions spread evenly over the file (MT-bench: every category); 0: all
    bench_out: str = "runs/bench"  # the directory for bench.json and bench.md
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: cuda if available, else cpu
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (or fp32, bf16, fp16); auto: bf16 on GPU, fp32 on CPU
    # force a chat template: vicuna | chatml | a .jinja file | Jinja source | raw (no template: the turns joined by
    # newlines); None: the target's own
    template: str | None = None
    system: str | None = None  # a system message before the first user turn
    cuda_graph: bool | None = None  # capture each step as a CUDA graph; None: on for cuda (the CPU runs steps eagerly)
    # torch.compile each step (before its capture); None: a GPU's speculative steps (the first run on a machine takes
    # minutes, then inductor's cache serves), not its plain step (compiled, it measured no faster: results/README.md)
    compile: bool | None = None
    # torch.compile's mode: default | max-autotune-no-cudagraphs (reduce-overhead and max-autotune make CUDA graphs of
    # their own: only with --cuda-graph false)
    compile_mode: str = "default"


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
# sampling: inverse-CDF draws from uniforms made before a step (a captured step must not own a generator)

def probs_from_logits(logits, cfg):
    """(..., V) -> the sampling distribution of cfg (temperature > 0), defined once in generate.probs."""
    return generate.probs(logits, cfg.temperature, cfg.top_p, cfg.top_k_sample)


def draw(p, u):
    """p (..., V) probabilities, maybe unnormalised; u (...) uniforms in [0, 1) -> token ids (...): the first token
    whose cumulative mass exceeds u * total, so token y comes with probability p(y) / total (never one of mass 0)."""
    cdf = p.double().cumsum(-1)  # (fp64: the tail of a 49K-token cumulative sum keeps its precision)
    return torch.searchsorted(cdf, (u.double() * cdf[..., -1])[..., None], right=True)[..., 0].clamp_max(
        p.shape[-1] - 1)


def pick(logits, cfg, u=None):
    """logits (..., V) -> tokens (...): argmax at temperature 0 (no division), else a draw with uniforms u (...)."""
    return logits.argmax(-1) if cfg.temperature == 0 else draw(probs_from_logits(logits, cfg), u)


def noise(gen, cfg, count, device):
    """The uniforms a step consumes, as a tuple of step inputs: () at temperature 0."""
    return () if cfg.temperature == 0 else (torch.rand(count, generator=gen, device=device),)


def finish(out, new, stop_ids, max_new_tokens):
    """Append `new` tokens to `out` up to a stop token or max_new_tokens; return True when the answer is done."""
    for t in new:
        out.append(t)
        if t in stop_ids or len(out) >= max_new_tokens:
            return True
    return False


def sync(device):  # (a timing ends after the device's work)
    torch.cuda.synchronize(device) if torch.device(device).type == "cuda" else None


# -----------------------------------------------------------------------------
# static steps: made once per cache size and setting, kept on the target (like gpt-fast's setup_caches): a graph
# replays on the tensors it was captured with. A step attends over the first W slots (module docstring: WIDTH);
# stale slots of earlier answers are masked out or rewritten before anything reads them.

WIDTH = generate.WIDTH_STEP


def tree_sizes(depth, top_k, tree_tokens):
    """-> (pool, queries, kept): nodes proposed, nodes that query the draft, nodes verified (root excluded)."""
    pool = top_k + (depth - 1) * top_k * top_k  # step 1: the root's k children; later steps: k x k each
    return pool, 1 + (depth - 1) * top_k, min(tree_tokens, pool)


def cache_slots(target, cfg):  # L, the cache slots of every answer: --max-len or the device's, at most the context
    return min(cfg.max_len or MAX_LEN.get(target.output.weight.device.type, 1024), target.args.max_seq_len)


def check_length(target, cfg, n_prompt, spec):
    """-> (L, extra): the cache slots of every answer (cache_slots) and the slots a tree takes past its prefix,
    after checking that the prompt, its answer and one tree fit."""
    L = cache_slots(target, cfg)
    k, keep = (1, cfg.depth) if cfg.mode == "chain" else (cfg.top_k, cfg.tree_tokens)
    _, Q, N = tree_sizes(cfg.depth, k, keep) if spec else (0, 0, -1)
    extra = max(N + 1, Q)  # a tree's slots past the answer: target (root + nodes), draft (queries)
    if n_prompt == 0:
        raise BeagleError("empty prompt")
    if n_prompt + cfg.max_new_tokens + extra > L:
        raise BeagleError(f"prompt of {n_prompt} tokens is longer than the context allows ({L} cache slots "
                          f"(--max-len) - --max-new-tokens {cfg.max_new_tokens} - {extra} for a tree)")
    return L, extra


def spec_steps(target, draft, cfg, n_prompt):
    """-> (cache, draft cache, extra, steps): steps[W] = (step, arange(W)); step(arange(W), n (1,), root (1,), *u)
    = iterate(...) over the first W slots of caches of L slots (check_length), for a prefix n <= W - extra."""
    dev, dtype = target.output.weight.device, target.output.weight.dtype
    L, extra = check_length(target, cfg, n_prompt, True)
    draft.check_top_k(cfg.top_k)
    setting = (cfg.temperature, cfg.top_p, cfg.top_k_sample) if cfg.temperature else 0
    on = bool(cfg.cuda_graph) and dev.type == "cuda"
    mode = compiled(cfg, "tree", dev)
    # the head is part of the key: a graph captured with one head would keep reading that head's weights
    key = (L, draft, draft.head, cfg.depth, cfg.top_k, cfg.tree_tokens, setting, on, mode)
    store = target.__dict__.setdefault("decode_static", {})  # the key keeps the draft (and its head) alive
    if key not in store:
        if on and "pool" not in store:
            store["pool"] = torch.cuda.graph_pool_handle()
        cache, dcache = KVCache(target.args, 1, L, dev, dtype), DraftCache(draft, L)
        fn = lambda ar, n, root, *u: iterate(target, draft, cache, dcache, cfg, ar, n, root, *u)
        steps = {W: (Graphed(fn, on, store.get("pool"), mode is not None, mode, width=0), torch.arange(W, device=dev))
                 for W in sorted({min(w, L) for w in range(WIDTH, L + WIDTH, WIDTH)}) if W > extra}
        store[key] = cache, dcache, extra, steps
    return store[key]


def width(steps, n, extra):  # the narrowest step whose width holds the prefix n and one tree
    return steps[min(W for W in steps if W >= n + extra)]


# -----------------------------------------------------------------------------
# plain decoding: generate.py's batched engine at batch 1 (prefill, then one captured step per token and width)

def generate_ar(target, prompt, cfg, stop_ids, gen=None, on_tokens=None):
    dev = target.output.weight.device
    L, _ = check_length(target, cfg, len(prompt), False)
    out = []

    def show(tokens):  # the engine streams the new tokens at batch 1 (a stop token included): one read per token
        out[:] = tokens
        if on_tokens:
            on_tokens(out)

    sync(dev)
    t0 = time.perf_counter()
    generate.generate(target, [prompt], cfg.max_new_tokens, stop_ids, cfg.temperature, cfg.top_p, cfg.top_k_sample,
                      gen, show, 1, L, cfg.cuda_graph, compile=compiled(cfg, "ar", dev))
    sync(dev)
    return Result(out, time.perf_counter() - t0, len(out), [])  # one target forward per token


# -----------------------------------------------------------------------------
# speculative decoding. n, the prefix length, is a (1,) tensor on the device (indexing with a 0-d tensor would read
# it back to the host); every mask spans the W cache slots of the step, ar = arange(W).

def tree_mask(block, n, ar):
    """block (R, C) bool, who sees whom among the C slots n..n+C-1 -> (R, W) bool over the cache slots ar =
    arange(W): the prefix (slots < n) visible to every row, block on slots n..n+C-1, nothing beyond."""
    C = block.shape[1]
    cols = ar - n  # (W,) slot - n
    return (cols < 0) | (block[:, cols.clamp(0, C - 1)] & (cols >= 0) & (cols < C))


@torch.no_grad()
def draft_tree(target, draft, dcache, ar, n, root, depth, top_k, tree_tokens):
    """EAGLE-2 dynamic tree from the bonus token `root` ((1,), position n) over the n true draft keys, in the first
    W slots of the draft cache. Returns the tree as flat tensors over T = kept + 1 nodes, node 0 the root, parents
    before children: tokens (T,), parent (T,) (the root its own), depth (T,), anc (T, T) bool ancestor-or-self."""
    dev, k = dcache.k.device, top_k
    P, Q, N = tree_sizes(depth, k, tree_tokens)
    # the pool of proposed nodes, in creation order: token, pool index of the parent (P = the root), depth, and the
    # cumulative draft log-prob
    tok, parent, dep = (torch.empty(P, dtype=torch.long, device=dev) for _ in range(3))
    score = torch.empty(P, dtype=torch.float32, device=dev)
    # qanc[q]: which querying nodes are ancestors-or-self of querying node q (q = its draft scratch slot - n)
    # (built from the identity: a step never writes a Python scalar into a tensor, on a GPU a synchronizing copy)
    qanc = torch.eye(Q, dtype=torch.bool, device=dev)  # query 0 (the root) is its own only ancestor

    # step 1: the root queries the true keys only (its parent: the newest committed token)
    hat = draft.propose(dcache, n, n, target.tok_embeddings(root.view(1, 1)), None, (ar < n)[None])  # (1, 1, dim)
    values, indices = draft.top(target, hat[0], k)  # (1, k)
    tok[:k], score[:k] = indices[0], values[0]
    parent[:k].fill_(P), dep[:k].fill_(1)
    front = torch.arange(k, device=dev)  # pool indices of the frontier
    front_q = torch.zeros(k, dtype=torch.long, device=dev)  # query index of each frontier node's parent
    nq, prev = 1, 0  # query indices used so far; first query index of the previous step

    for s in range(2, depth + 1):
        # the frontier (depth s-1, position n+s-1) queries the true keys + the scratch slots of its ancestors'
        # queries (each query wrote its own K/V to slot n + its index)
        qi = torch.arange(nq, nq + k, device=dev)
        qanc[qi] |= qanc[front_q]  # rows qi are still identity rows: self + the parent's ancestors
        hat = draft.propose(dcache, n + nq, (n + s - 1).expand(k), target.tok_embeddings(tok[front][None]),
                            hat[:, front_q - prev], tree_mask(qanc[front_q, :nq], n, ar))  # (1, k, dim)
        values, indices = draft.top(target, hat[0], k)  # (k, k) children of each frontier node
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
    par = torch.cat([zero, where[parent[keep]]])
    return torch.cat([root.view(1), tok[keep]]), par, torch.cat([zero, dep[keep]]), ancestors(par, depth)


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
    """-> (path, m, bonus): path (max_depth+1,) the tree indices of the longest path of nodes that equal the
    target's argmax after their parent, root first, padded past its end with the root; m (1,) its draft tokens;
    bonus (1,) the target's argmax after its end."""
    choice = logits.argmax(-1)  # (T,) the target's token after each node
    ok = (tokens == choice[parent]) | (torch.arange(len(tokens), device=tokens.device) == 0)  # the root is given
    on_path = ~(anc & ~ok).any(-1)  # the node and all its ancestors match
    best = (depth * on_path).argmax().view(1)  # siblings differ, so the matching nodes form one path: its end
    # (best is (1,), not 0-d: indexing with a 0-d tensor would read it back to the host)
    levels = torch.arange(max_depth + 1, device=tokens.device)[:, None]
    path = (anc[best] & (depth == levels)).long().argmax(-1)  # the path's node at each depth; 0 past its end
    return path, depth[best], choice[best]


def accept_sampled(p, tokens, parent, max_depth, top_k, u):
    """Sequential rejection sampling down the tree, with fixed shapes. p (T, V): the target's (temperature/top-p/
    top-k adjusted) distribution after each node; u (max_depth * top_k + 1,) uniforms in [0, 1). At a node with
    children c_1..c_m (fixed by the draft, whatever it is), accept c_1 with probability p(c_1); if rejected, zero
    it in the residual r and accept c_2 with probability r(c_2) / sum(r); ...; if all are rejected, sample from r.
    Then P(c_j) = p(c_j) and P(y) = p(y) for any other y: the token is distributed exactly as p, however the
    candidates were chosen. Given an accepted child we continue with the target's distribution after it, so by
    induction the whole output follows the target. -> (path, m, bonus) as accept_greedy (padded with its end)."""
    T, dev = p.shape[0], p.device
    cols = torch.arange(T, device=dev)
    child = (parent[None, :] == cols[:, None]) & (cols[None, :] > 0)  # (T, T): j is a child of i
    kids = torch.where(child, cols, T + cols).argsort(-1)[:, :top_k]  # (T, K) children first, in creation order
    real = child.gather(1, kids)  # (T, K): which entries of kids are children (best draft score first)
    K = kids.shape[1]
    node = m = torch.zeros(1, dtype=torch.long, device=dev)  # (rebound below, never written in place)
    alive, path = torch.ones(1, dtype=torch.bool, device=dev), [node]
    for d in range(max_depth):
        c, ok, q = kids[node][0], real[node][0], p[node][0]  # (K,), (K,), (V,)
        pc = torch.where(ok, q[tokens[c]], 0.0)  # (K,) target mass of each candidate
        rest = (q.sum() - (pc.cumsum(0) - pc)).clamp_min(1e-30)  # residual mass when c_j is tried
        hit = ok & (u[d * top_k:d * top_k + K] * rest < pc) & alive
        alive = hit.any().view(1)  # still descending: some child accepted (the first hit, as in the sequence)
        node = torch.where(alive, c[hit.long().argmax().view(1)], node)
        m, path = m + alive, path + [node]
    # the bonus token after the path's end, from its residual: its children (all tried and rejected, if any) removed
    c, ok, q = kids[node][0], real[node][0], p[node][0]
    r = q * (torch.zeros_like(q).index_add_(0, tokens[c], ok.to(q.dtype)) == 0)
    r = torch.where(r.sum() > 0, r, q)  # (all mass on candidates: one was accepted with probability 1)
    return torch.cat(path), m, draw(r, u[-1:])


@torch.no_grad()
def iterate(target, draft, cache, dcache, cfg, ar, n, root, *u):
    """One iteration after a committed prefix of n tokens ((1,)) whose true states are in both caches; root = the
    bonus token (1,) at position n; ar = arange(W), the cache slots every attention spans; u: the uniforms of
    accept_sampled (temperature > 0). Draft a tree, verify root +
    nodes in ONE target forward (node i in slot n+i at position n+depth_i, seeing the prefix, its ancestors and
    itself), accept, commit. -> (found, n + m + 1, next root): found (depth+2,) = [m, the path's m draft tokens
    (then padding), the bonus token]."""
    tokens, parent, dep, anc = draft_tree(target, draft, dcache, ar, n, root, cfg.depth, cfg.top_k, cfg.tree_tokens)
    slots = n + torch.arange(tokens.shape[0], device=tokens.device)
    logits, h = target(tokens[None], n + dep, cache, tree_mask(anc, n, ar), slots=slots)
    if cfg.temperature == 0:
        path, m, bonus = accept_greedy(logits[0], tokens, parent, dep, anc, cfg.depth)
    else:
        path, m, bonus = accept_sampled(probs_from_logits(logits[0], cfg), tokens, parent, cfg.depth, cfg.top_k, *u)
    # commit: the target K/V of the path's nodes move to slots n, n+1, ... (the root is there already), and the draft
    # commits the path's true states h (a padded path writes junk past the new prefix: never read)
    cache.move(n + path[1:], n + 1)
    draft.commit(dcache, n, h[:, path], target.tok_embeddings(tokens[path[1:]][None]))
    return torch.cat([m, tokens[path[1:]], bonus]), n + m + 1, bonus


def spec_config(cfg):  # a chain is the tree with one child per node
    return dataclasses.replace(cfg, top_k=1, tree_tokens=cfg.depth) if cfg.mode == "chain" else cfg


@torch.no_grad()
def generate_spec(target, draft, prompt, cfg, stop_ids, gen=None, on_tokens=None):
    """Speculative decoding; cfg.mode chain | tree, cfg.depth / top_k / tree_tokens already resolved."""
    dev, cfg = target.output.weight.device, spec_config(cfg)
    n = len(prompt)  # the prefix length, on the host too: it picks each iteration's width
    cache, dcache, extra, steps = spec_steps(target, draft, cfg, n)
    sync(dev)
    t0 = time.perf_counter()
    ids, pos = torch.tensor([prompt], device=dev), torch.arange(n, device=dev)
    with llama.any_length():
        logits, h = target(ids, pos, cache, torch.ones(n, n, dtype=torch.bool, device=dev).tril(), last_only=True)
    draft.commit(dcache, 0, h, target.tok_embeddings(ids[:, 1:]))
    root, n_dev = pick(logits[0, -1:], cfg, *noise(gen, cfg, 1, dev)), torch.tensor([n], device=dev)
    out, accepted, new, show = [], [], root.tolist(), on_tokens or (lambda out: None)
    while not finish(out, new, stop_ids, cfg.max_new_tokens):
        show(out)
        step, ar = width(steps, n, extra)
        found, n_dev, root = step(ar, n_dev, root, *noise(gen, cfg, cfg.depth * cfg.top_k + 1, dev))
        m, *found = found.tolist()  # the one read back per iteration
        accepted.append(m)
        new, n = found[:m] + found[-1:], n + m + 1
    show(out)
    sync(dev)
    return Result(out, time.perf_counter() - t0, 1 + len(accepted), accepted)


# -----------------------------------------------------------------------------
# options and loading

MODES = ("ar", "chain", "tree")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
AT_LEAST = {  # integer options: the smallest value allowed, and what the smallest ones mean
    "max_new_tokens": (1, ""), "depth": (0, " (0: chosen by device)"), "top_k": (0, " (0: chosen by device)"),
    "tree_tokens": (0, " (0: chosen by device)"), "draft_vocab": (-1, " (0: all tokens, -1: chosen by device)"),
    "max_len": (0, " (0: chosen by device)"), "top_k_sample": (0, " (0: no top-k filter)"),
    "bench_limit": (0, " (0: every question)")}


def check_config(cfg):
    """Every option's range, before anything is loaded: a one-line error that names the option and what it allows."""
    if cfg.mode not in MODES:
        raise BeagleError(f"--mode must be one of {' | '.join(MODES)} (got {cfg.mode!r})")
    common.check_at_least(cfg, AT_LEAST)
    if not (math.isfinite(cfg.temperature) and cfg.temperature >= 0):
        raise BeagleError(f"--temperature must be a finite number >= 0 (0: greedy), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise BeagleError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not 0 <= cfg.seed < 2 ** 32:
        raise BeagleError(f"--seed must be in [0, 2^32), got {cfg.seed}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise BeagleError(f"--compile-mode must be one of {' | '.join(COMPILE_MODES)} (got {cfg.compile_mode!r})")
    for name in ("prompt", "system", "template"):
        if getattr(cfg, name) is not None and not is_text(getattr(cfg, name)):
            raise BeagleError(f"--{name} must be non-blank UTF-8 text, got {short(getattr(cfg, name))}")


def resolve(cfg):
    """Check the options and fill the device-dependent defaults in place."""
    check_config(cfg)
    cfg.device, dtype = common.device_and_dtype(cfg.device, cfg.dtype)
    cfg.dtype = str(dtype).removeprefix("torch.")  # resolved, and spelled one way in reports
    gpu = torch.device(cfg.device).type == "cuda"
    cfg.cuda_graph = gpu if cfg.cuda_graph is None else cfg.cuda_graph
    if compiled(cfg, cfg.mode) and cfg.cuda_graph and cfg.compile_mode in ("reduce-overhead", "max-autotune"):
        raise BeagleError(f"--compile-mode {cfg.compile_mode} makes CUDA graphs of its own: add --cuda-graph false "
                          "or take default | max-autotune-no-cudagraphs")
    if gpu:  # (the CPU's are chosen for the machine once the models are loaded: load, cpu_defaults)
        cfg.depth, cfg.top_k, cfg.tree_tokens = (mine or default for mine, default in
                                                 zip((cfg.depth, cfg.top_k, cfg.tree_tokens),
                                                     GPU_TREE_SAMPLED if cfg.temperature > 0 else GPU_TREE))


def compiled(cfg, mode, device=None):
    """torch.compile's mode for the steps of decoding mode `mode` (ar | chain | tree) on `device` (default: cfg's)."""
    on = cfg.compile if cfg.compile is not None else mode != "ar" and torch.device(device or cfg.device).type == "cuda"
    return cfg.compile_mode if on else None


def load(cfg):
    """-> (target, tokenizer, draft or None); falls back to plain decoding when there is no draft, or on a CPU where no
    tree is predicted to pay (calibrate.py)."""
    template = None if cfg.template == "raw" else cfg.template
    target, tokenizer = convert.load_target(cfg.target, cfg.device, DTYPES[cfg.dtype], template=template)
    target.eval()
    path = str(SHIPPED.get(cfg.draft, cfg.draft)) if cfg.draft else (
        str(DEFAULT_DRAFT) if cfg.target is None and DEFAULT_DRAFT.is_file() else None)
    if path is None and cfg.mode != "ar":
        print("note: no draft (give --draft PATH); plain decoding", file=sys.stderr)
        cfg.mode = "ar"
    if cfg.mode == "ar":
        return target, tokenizer, None
    draft = beagle.load_draft(path, target, cfg.device, DTYPES[cfg.dtype])
    auto = cfg.draft_vocab < 0
    draft.set_vocab(target, 0 if auto else cfg.draft_vocab, explicit=not auto)  # (auto: the GPU's, all tokens)
    draft.check_top_k(1 if cfg.mode == "chain" else cfg.top_k or 1)  # before anything is printed or timed
    shape_left = not cfg.depth or cfg.mode == "tree" and not (cfg.top_k and cfg.tree_tokens)
    if torch.device(cfg.device).type == "cpu" and (shape_left or auto and draft.vocab is not None):  # (a choice)
        import calibrate  # (it imports this file)
        if not calibrate.cpu_defaults(target, draft, cfg):
            cfg.mode = "ar"
            return target, tokenizer, None
        draft.check_top_k(1 if cfg.mode == "chain" else cfg.top_k)
    cfg.draft_vocab = 0 if draft.head is None else draft.vocab_size()  # resolved, for the reports
    return target, tokenizer, draft


def run(target, draft, prompt, cfg, stop_ids, on_tokens=None, mode=None):
    """One answer in `mode` (default cfg.mode), with a fresh generator seeded by cfg.seed."""
    mode = mode or cfg.mode
    gen = torch.Generator(device=target.output.weight.device).manual_seed(cfg.seed)
    if mode == "ar":
        return generate_ar(target, prompt, cfg, stop_ids, gen, on_tokens)
    return generate_spec(target, draft, prompt, dataclasses.replace(cfg, mode=mode), stop_ids, gen, on_tokens)


# -----------------------------------------------------------------------------
# the command line: answer prompts, or benchmark plain vs speculative decoding

def main(cfg):
    import bench  # the harness: conversations, warm-up, the benchmark (bench.py imports this file)
    resolve(cfg)
    if [cfg.prompt, cfg.prompt_file, cfg.bench].count(None) != 2:  # (--bench with a prompt: it would be ignored)
        raise BeagleError("give one of --prompt, --prompt-file or --bench")
    if cfg.bench is not None:
        return bench.bench(cfg)
    # [(user turns, category)]: each answer is carried into the next turn
    convs = [([cfg.prompt], "prompt")] if cfg.prompt is not None else common.read_prompt_file(cfg.prompt_file)
    target, tokenizer, draft = load(cfg)
    stop = set(tokenizer.stop_ids)
    modes = (cfg.mode, "ar") if cfg.compare and cfg.mode != "ar" else (cfg.mode,)
    if len(modes) > 1 or cfg.cuda_graph or any(compiled(cfg, m) for m in modes):  # capture, compile: not timed
        bench.warm_up(target, draft, tokenizer.conversation(convs[0][0][:1], [], cfg.system, cfg.template == "raw"),
                      cfg, modes)
    for turns, _ in convs:
        for i, res in bench.converse(target, draft, tokenizer, cfg, turns, modes, stop, stream=not cfg.json):
            r = res[cfg.mode]
            row = dict(prompt=turns[i], turn=i + 1, tokens=r.tokens, text=tokenizer.decode(r.tokens, stop),
                       new_tokens=len(r.tokens), seconds=round(r.seconds, 4), mode=cfg.mode,
                       tokens_per_s=round(len(r.tokens) / r.seconds, 2), tau=round(r.tau, 3),
                       target_forwards=r.target_forwards, accepted_lengths=r.accepted_lengths)
            if not cfg.json:
                print(f"\n[{cfg.mode}] {bench.summary(r)}")
            if len(modes) > 1:  # --compare: plain decoding on the same conversation
                b = res["ar"]
                speedup = (len(r.tokens) / r.seconds) / (len(b.tokens) / b.seconds)
                row.update(plain_seconds=round(b.seconds, 4), plain_tokens=len(b.tokens), speedup=round(speedup, 3),
                           identical=b.tokens == r.tokens)
                if not cfg.json:
                    print(f"[ar] {bench.summary(b)}; speedup {speedup:.2f}x; identical to plain decoding: "
                          f"{'yes' if b.tokens == r.tokens else 'no'}" + (" (sampling)" if cfg.temperature else ""))
            if cfg.json:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    try:
        main(common.cli(DecodeConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line (--bench has written the questions done so far)
        sys.exit("interrupted")
