"""
The CPU's decoding defaults, fitted to the machine they run on. What a bigger tree costs differs between CPUs (on
one 2-core machine a target forward of 1 to 8 tokens costs about the same, on another 8 tokens cost 2.5x one), so no
fixed tree shape is right everywhere. On first use decode.py measures this machine once (a few seconds; cached in
convert.cache_dir()/cpu-costs.json) and takes the tree shape and draft vocabulary of most predicted tokens/s:

    python decode.py --prompt "Hi" --device cpu               # calibrates on first use, then reads the cache
    BEAGLE_CPU_COSTS='{"forward_ms": [39, 38, 52, 51, 63, 76, 88, 100]}' python decode.py --prompt "Hi" --device cpu

predicted tokens/s = expected tokens per iteration (expected_tau, a fixed acceptance model of the shipped draft)
/ the iteration's cost (the verifying forward, the draft steps, the rest), against plain decoding's one forward a
token; where no shape is predicted to pay, plain decoding.
"""
import json
import os
import sys
import time

import torch

import common
import convert
from bench import hardware
from common import BeagleError
from beagle import DraftCache
from decode import CPU_DRAFT_VOCAB, WIDTH, DecodeConfig, cache_slots, iterate, tree_mask, tree_sizes
from llama import KVCache

# the acceptance model (expected_tau): rank-1 and rank-2 acceptance, the tail's ratio; greedy, and sampling
ACCEPT = {"greedy": (0.42, 0.10, 0.6), "sampled": (0.22, 0.11, 0.8)}
DECAY = 0.95
MIN_SPEEDUP = 1.05  # below this predicted speedup (the model's error) the CPU decodes plainly


def expected_tau(depth, top_k, tree_tokens, sampled=False):
    """Tokens per iteration predicted by a fixed model of the shipped draft, greedy: at any node the target's token is
    the draft's rank-r proposal with probability p_1 = 0.42, p_2 = 0.10, p_r = 0.10 * 0.6^(r-2), times 0.95 per step
    after the first, independently from step to step. Fitted to its CPU MT-bench with 2 / 2 / 3 (results/round2/
    session2/bench_greedy_cpu_amd.md: step 1 accepted 0.52 = p_1 + p_2, the depth-2 node under the rank-1 child
    0.343 of those, p_1^2 ~ 0.18); the tail stays below its GPU top-10 acceptance (0.76), the decay is its held-out
    agreement's fall from step 1 to 2 (0.560 -> 0.534); the same for the 4096-token subset (round 1: the same tau).
    Deeper or wider than 2 / 2 it is an extrapolation. draft_tree runs on the model (a node's score: the probability
    that its whole path is accepted), and the kept nodes' path probabilities sum to the expected accepted tokens.
    sampled (temperature > 0): p_1 = 0.22, p_2 = 0.11, p_r = 0.11 * 0.8^(r-2), fitted (least squares, within 0.07
    tau) to the taus of seven shapes at temperature 1.0 on the CPU (results/round2/session5/tree_sweep_cpu.log):
    sampling accepts the rank-1 child less often and the others more (rejection sampling tries them in turn). It is
    used at any temperature > 0 (lower temperatures lie between the two models: the smaller tree is the safe side)."""
    p1, p2, tail = ACCEPT["sampled" if sampled else "greedy"]
    p = [p1] + [p2 * tail ** r for r in range(top_k - 1)]
    front, pool = [1.0], []
    for s in range(depth):
        kids = sorted((q * p[r] * DECAY ** s for q in front for r in range(top_k)), reverse=True)
        pool, front = pool + kids, kids[:top_k]
    return 1 + sum(sorted(pool, reverse=True)[:tree_tokens])


def at(ms, n):  # a cost table over 1..len(ms) rows, at n rows; beyond it linear in n from its last entry
    return ms[n - 1] if n <= len(ms) else ms[-1] * n / len(ms)


def draft_step_ms(costs, vocab, rows):  # between (or beyond) the measured vocabularies: linear in the vocabulary
    points = sorted((int(v), at(ms, rows)) for v, ms in costs["draft_ms"].items())
    (lo, a), (hi, b) = points[0], points[-1]
    return a if hi == lo else a + (b - a) * (vocab - lo) / (hi - lo)


def iteration_ms(costs, depth, top_k, tree_tokens, vocab):
    """The verifying forward (root + kept nodes), the draft steps (the root's query, then top_k queries a step) and
    the rest (masks, acceptance, moving K/V: overhead_ms)."""
    keep = tree_sizes(depth, top_k, tree_tokens)[2]
    return (at(costs["forward_ms"], keep + 1) + draft_step_ms(costs, vocab, 1)
            + (depth - 1) * draft_step_ms(costs, vocab, top_k) + costs["overhead_ms"])


def choose(costs, cfg, vocabs):
    """-> (predicted speedup over plain decoding, (depth, top_k, tree_tokens), vocabulary): most predicted tokens/s
    among the shapes up to 4 / 4 / 7 (forwards of up to 8 tokens, as measured) that keep cfg's explicit options
    (chain mode: top-k 1) and the vocabularies `vocabs`; the smaller on a tie."""
    chain, best = cfg.mode == "chain", None
    for depth in [cfg.depth] if cfg.depth else range(1, 5):
        for top_k in [1] if chain else [cfg.top_k] if cfg.top_k else range(1, min(5, min(vocabs) + 1)):
            pool = tree_sizes(depth, top_k, 1)[0]
            for keep in [depth] if chain else [cfg.tree_tokens] if cfg.tree_tokens else range(1, min(pool, 7) + 1):
                for vocab in vocabs:
                    speed = (expected_tau(depth, top_k, keep, cfg.temperature > 0)
                             / iteration_ms(costs, depth, top_k, keep, vocab))
                    if best is None or speed > best[0]:
                        best = speed, (depth, top_k, keep), vocab
    return best[0] * at(costs["forward_ms"], 1), best[1], best[2]  # plain decoding: a 1-token forward a token


def median_ms(fn, reps=5):
    fn()  # (first calls allocate)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[reps // 2], 2)


@torch.no_grad()
def measure_costs(target, draft, max_len):
    """This CPU's costs (ms, medians of 5): a target forward of 1..8 tokens; a draft step (queries, the head's top 2,
    their K/V) of 1..8 rows, from the 4096-token subset and from all tokens; what else a real 2 / 2 / 3 iteration
    costs. Caches of max_len slots, a prefix of a quarter of them: every step attends over the width decoding would
    use there (decode.WIDTH), so the costs are those of a typical answer's middle."""
    V, n, weight = target.args.vocab_size, torch.tensor([max_len // 4]), target.output.weight
    ar = torch.arange(min(max_len, -(-(max_len // 4 + 16) // WIDTH) * WIDTH))  # (16: the largest CPU tree's slots)
    cache, dcache, head = KVCache(target.args, 1, max_len, dtype=weight.dtype), DraftCache(draft, max_len), draft.head
    tokens, rows = torch.arange(1, 9)[None], n + torch.arange(8)
    prefix = (ar < n).expand(8, -1)  # (8, W): up to 8 queries see the prefix
    causal = lambda T: tree_mask(torch.ones(T, T, dtype=torch.bool).tril(), n, ar)
    costs = dict(forward_ms=[median_ms(lambda: target(tokens[:, :T], rows[:T], cache, causal(T), slots=rows[:T]))
                             for T in range(1, 9)], draft_ms={}, overhead_ms=0.0)

    def draft_step(R):  # R queries (beagle.py's draft interface: any draft) and the head's top 2 of each
        hat = draft.propose(dcache, n, rows[:R], target.tok_embeddings(tokens[:, :R]), None, prefix[:R])
        draft.top(target, hat[0], 2)

    for vocab in sorted({min(CPU_DRAFT_VOCAB, V), V}, reverse=True):  # (a head of the first rows: as costly as any)
        draft.head = None if vocab == V else (torch.arange(vocab), weight[:vocab].contiguous())
        costs["draft_ms"][str(vocab)] = [median_ms(lambda: draft_step(R)) for R in range(1, 9)]
    ref = DecodeConfig(depth=2, top_k=2, tree_tokens=3)  # (with the subset, the loop's last head)
    real = median_ms(lambda: iterate(target, draft, cache, dcache, ref, ar, n, tokens[0, :1]))
    draft.head = head
    costs["overhead_ms"] = round(max(0.0, real - iteration_ms(costs, 2, 2, 3, vocab)), 2)
    return costs


def cpu_costs(target, draft, max_len):
    """-> (costs, where from): measured on first use (one line on stderr), then read from
    convert.cache_dir()/cpu-costs.json, keyed by the CPU, threads, torch, dtype, cache slots and target shape.
    BEAGLE_CPU_COSTS='{"forward_ms": [...]}' (any of the three keys) forces numbers: another machine's, a test's."""
    try:
        forced = json.loads(os.environ.get("BEAGLE_CPU_COSTS") or "{}")
    except ValueError:
        forced = None
    if not isinstance(forced, dict) or not set(forced) <= {"forward_ms", "draft_ms", "overhead_ms"}:
        raise BeagleError("BEAGLE_CPU_COSTS must be a JSON object of forward_ms, draft_ms or overhead_ms")
    times = lambda x: isinstance(x, list) and x and all(isinstance(t, (int, float)) and t > 0 for t in x)
    ok = {"forward_ms": times, "overhead_ms": lambda x: isinstance(x, (int, float)) and x >= 0,
          "draft_ms": lambda x: isinstance(x, dict) and x and all(k.isdigit() and times(t) for k, t in x.items())}
    bad = next((key for key, value in forced.items() if not ok[key](value)), None)
    if bad:
        raise BeagleError(f"BEAGLE_CPU_COSTS: {bad} must be " + {
            "forward_ms": "a list of milliseconds > 0 (a forward of 1, 2, ... tokens)", "overhead_ms": "a number >= 0",
            "draft_ms": 'an object {"VOCABULARY": [milliseconds > 0 for 1, 2, ... rows]}'}[bad]
            + f", got {forced[bad]!r}")
    if len(forced) == 3:
        return forced, "forced by BEAGLE_CPU_COSTS"
    a, cpu, path = target.args, hardware("cpu"), convert.cache_dir() / "cpu-costs.json"
    key = (f"{cpu}, torch {torch.__version__}, {target.output.weight.dtype}, {max_len} slots, target {a.n_layers} "
           f"layers of {a.dim} (hidden {a.hidden_dim}, heads {a.n_heads}/{a.n_kv_heads}), vocabulary {a.vocab_size}")
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet (or unreadable: measured again)
        table = {}
    source = "cached" if key in table else "measured now"
    if key not in table:
        print(f"calibrating the CPU tree shape once for {cpu} ... (cached in {path}; delete it to measure again)",
              file=sys.stderr)
        table[key] = measure_costs(target, draft, max_len)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            common.write_atomic(path, lambda tmp: tmp.write_text(json.dumps(table, indent=1) + "\n"))
        except OSError as e:
            print(f"note: cannot cache the CPU's costs ({e}): measured again next time", file=sys.stderr)
    return {**table[key], **forced}, "partly forced by BEAGLE_CPU_COSTS" if forced else source


def cpu_defaults(target, draft, cfg):
    """Fill the CPU options left to the device with the choice for this machine; -> False where no tree is predicted
    to pay and none was asked for: decode plainly. One line on stderr, unless the costs were cached and it pays."""
    V, auto = target.args.vocab_size, cfg.draft_vocab < 0
    ranked = draft.vocab is not None  # (without a token ranking, no subset)
    vocabs = sorted({min(CPU_DRAFT_VOCAB, V), V} if ranked else {V}) if auto else [draft.vocab_size()]
    # (at WIDTH slots at least, or the target's context: the measurement's own steps need them, whatever --max-len)
    costs, source = cpu_costs(target, draft, max(cache_slots(target, cfg), min(WIDTH, target.args.max_seq_len)))
    speedup, shape, vocab = choose(costs, cfg, vocabs)
    line = (f"CPU: {f'chain {shape[0]}' if cfg.mode == 'chain' else 'tree ' + ' / '.join(map(str, shape))}, draft "
            f"vocabulary {vocab}: predicted {speedup:.2f}x plain decoding's tokens/s (a forward of 1..8 tokens "
            f"{' / '.join(f'{x:.1f}' for x in costs['forward_ms'])} ms; {source})")
    if speedup < MIN_SPEEDUP and not cfg.bench and not cfg.depth and (cfg.mode == "chain" or not (
            cfg.top_k or cfg.tree_tokens)):  # (no shape asked for; a benchmark compares the two whatever we predict)
        print(f"note: {line}; below {MIN_SPEEDUP}x: plain decoding (--depth N: speculative anyway)", file=sys.stderr)
        return False
    if source != "cached" or speedup < MIN_SPEEDUP:
        print(line, file=sys.stderr)
    cfg.depth, cfg.top_k, cfg.tree_tokens = (mine or chosen for mine, chosen in
                                             zip((cfg.depth, cfg.top_k, cfg.tree_tokens), shape))
    if auto:
        draft.set_vocab(target, 0 if vocab == V else vocab)
    return True
