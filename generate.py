"""
Generation with the target: one batched, static-shape sampling engine (generate, with its KV cache and CUDA
graphs), and the self-distillation generator built on it (Magpie): the target writes a user turn from the bare
user header of its own chat template, then answers it, and the draft learns on text the target finds likely.

    python generate.py --out data/selfgen.jsonl --conversations 2000 --batch-size 64 --device cuda   # its own data
    python generate.py --target DIR --out data/selfgen.jsonl --conversations 20000 --turns 2     # another target
    torchrun --standalone --nproc-per-node 8 generate.py --out data/gen.jsonl --conversations 200000 --batch-size 2048

Then `python train.py --data data/selfgen.jsonl` reads the file (data.load_conversations). The engine is also
plain decoding (decode.py, batch 1):
    [(ids, stopped)] = generate(target, [prompt], max_new, stop_ids, temperature=0.0)   # new ids, stop token cut
    warm(target, 1, cache_len)                                # capture every width's step before a timed call

Re-running with the same --out continues the file up to --conversations, with those an uninterrupted run would
have written; under torchrun each rank makes every WORLD_SIZE-th batch and rank 0 writes the file. A conversation
whose first user turn is an MT-bench question (our evaluation set) is dropped.
"""
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import convert
import data
import llama
from common import BeagleError


@dataclass
class GenConfig:
    target: str | None = None  # model directory or GGUF for convert.load_target; None: default SmolLM2-135M-Instruct
    out: str = "data/selfgen.jsonl"  # the JSONL file written (appended to: a restarted run continues it)
    conversations: int = 2000  # wanted in `out`, >= 1; a restarted run appends until there are this many
    batch_size: int = 64  # conversations generated together, >= 1
    turns: int = 1  # user/assistant exchanges per conversation, >= 1
    max_user_tokens: int = 128  # >= 1; a user turn that has not ended by then is dropped
    max_reply_tokens: int = 512  # >= 1; a reply that reaches it is kept, truncated, and ends its conversation
    # >= 0, finite; the target's own distribution over questions: diversity (Magpie's choice)
    user_temperature: float = 1.0
    # >= 0, finite; replies a bit sharper than the target's distribution: close to what it says when it is decoded
    # (greedy or low temperature, the contexts the draft will see), while greedy replies of small models loop and
    # hit the cap
    reply_temperature: float = 0.7
    top_p: float = 1.0  # nucleus sampling of both turns, in (0, 1]; 1: off
    top_k: int = 0  # sample from the k most likely tokens, >= 0; 0: off
    seed: int = 0  # in [0, 2^32); batch i is generated from (seed, i): the same file whatever the ranks and restarts
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: cuda when available (torchrun: cuda:LOCAL_RANK)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto: bfloat16 on cuda, float32 on cpu
    cuda_graph: bool | None = None  # capture the decoding steps in CUDA graphs; None: on a GPU
    # torch.compile the decoding steps first, in this mode: default | max-autotune-no-cudagraphs; "": not compiled
    compile: str = ""
    shrink: bool = True  # finished rows leave the batch (halvings) instead of idling until the last row ends


# -----------------------------------------------------------------------------
# sampling and batched generation with the static KV cache


def probs(logits, temperature=1.0, top_p=1.0, top_k=0):
    """(..., V) -> (..., V) float32 probabilities with temperature, top-k and top-p applied (temperature > 0).
    The one definition of the sampling distribution: decode.py's lossless acceptance uses it too."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = logits.softmax(-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        ps, idx = p.sort(-1, descending=True)
        drop = ps.cumsum(-1) - ps >= top_p  # the mass before this token already reaches top_p
        p = p.scatter(-1, idx, ps.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None, u=None):
    """logits (B, V) -> token ids (B,). temperature 0 is an explicit argmax (never a division by zero). Else inverse
    CDF: token i where the cumulative probability first exceeds u (B,) uniforms in [0, 1) (drawn from generator
    when not given). No host sync and no RNG inside, so it can run in a CUDA graph with u as its input."""
    if temperature == 0:
        return logits.argmax(-1)
    if u is None:
        u = torch.rand(logits.shape[0], device=logits.device, generator=generator)
    c = probs(logits, temperature, top_p, top_k).cumsum(-1)  # (B, V)
    total = c[:, -1:]
    # u * total < total strictly (the rounding of u * total could reach it): some c[i] > x, the first one has
    # c[i - 1] <= x < c[i], so its probability is > 0 and a masked-out token (zero step) is never drawn
    x = torch.minimum(u[:, None].to(c.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(c, x, right=True).squeeze(-1)  # (B,)


def prefill_mask(live):
    """live (B, L) bool, False on left padding -> (B, L, L) causal mask over real keys. Pad queries see only
    themselves: a row with no visible key gives NaN in some SDPA kernels (CUDA math), and a NaN value
    poisons every query even where its weight is 0."""
    L = live.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=live.device).tril()
    return (causal & live[:, None, :]) | torch.eye(L, dtype=torch.bool, device=live.device)


# The engine. Each row of a fixed batch of B rows owns one row of a fixed KV cache of S slots. Prompts are
# left-padded so that every row's last prompt token sits at slot L - 1 and the new tokens at L, L + 1, ...: all rows
# share one position per step (the model wants positions (T,)). A row padded by p runs at positions shifted by p;
# RoPE makes attention scores depend only on position differences, so a constant shift leaves its outputs unchanged.
# Row b's real keys are the slots start[b] .. pos, so the step's mask is built on the device from (start, pos) and
# nothing is written to a mask. Attention spans a width W of the cache (the live slots rounded up to WIDTH_STEP),
# one captured graph per width: a step reads no more than WIDTH_STEP - 1 dead slots per row instead of the whole cache.
#
# Finished rows are not refilled with new prompts: that would need per-row positions (the model shares them across
# the batch) and a prefill of a few rows into a running cache. Instead the batch shrinks: at a check, once half the
# rows or more have finished, the unfinished ones move (KV rows gathered, each with its own uniforms) into the first
# rows of an engine of half the size (or a quarter, ...), whose cache is a view of this one's. A finished row then
# wastes its steps only until the next halving: the idle row-steps (stats["row_steps"] - stats["tokens"]) stay below
# about half of all row-steps, at the price of one KV gather per halving and one set of graphs per batch size.

PREFILL_TOKENS = 1 << 18  # prompt tokens per prefill forward: bounds its activations ((rows, L, hidden) and masks)
WIDTH_STEP = 128  # attention width granularity: more graphs (S / WIDTH_STEP per setting) against fewer dead slots
CHECK_EVERY = 8  # steps between host reads of the unfinished-row count (all done? shrink?): each read costs one
# pipeline bubble (the GPU idles while the host launches the next step, far less than a batched step), while a late
# read costs up to CHECK_EVERY - 1 steps of rows that have finished (once per call, and once per halving)


def _engine(model, B, S, setting, on, parent=None, compile=None):
    """The static buffers and steps for (B rows, S slots, sampling setting, graphed), kept on the model: a graph
    replays on the tensors it was captured with, and capture (3 eager steps) is paid once per width, not per call.
    The cache is shared by the settings of one (B, S); parent: the bigger engine a shrinking batch comes from, whose
    cache's first B rows become this one's (no new cache memory: the batches run one at a time). compile: a
    torch.compile mode for the step (one program for every width, llama.Graphed), or None."""
    store = model.__dict__.setdefault("generate_static", {})
    if (B, S, setting, on, compile) not in store:
        device, dtype = model.output.weight.device, model.output.weight.dtype
        if (B, S) not in store:
            cache = parent["cache"].rows(0, B) if parent else llama.KVCache(model.args, B, S, device, dtype)
            store[B, S] = {"cache": cache,
                           "start": torch.zeros(B, dtype=torch.long, device=device),  # row b's first real slot
                           "base": torch.zeros(1, dtype=torch.long, device=device),  # L: the first new token's slot
                           "out": torch.zeros(B, S, dtype=torch.long, device=device),  # new tokens, column t
                           "u": torch.zeros(S, B, device=device),  # one uniform per row and step, drawn per call
                           "done": torch.zeros(B, dtype=torch.bool, device=device),
                           "is_stop": torch.zeros(model.args.vocab_size, dtype=torch.bool, device=device),
                           "slots": torch.arange(S, device=device)}
        if on and "pool" not in store:
            store["pool"] = torch.cuda.graph_pool_handle()
        bufs, temperature, top_p, top_k = store[B, S], *setting

        def step(pos, ar):  # pos (1,): the slot of the token this step reads; it samples new token t = pos - L + 1
            t = pos - bufs["base"] + 1  # (1,)                 ar: arange(W), the width this step attends over
            tok = bufs["out"].index_select(1, t - 1)  # (B, 1): the previous new token
            mask = (ar >= bufs["start"][:, None]) & (ar <= pos)  # (B, W): row b's real keys so far
            logits, _ = model(tok, pos, bufs["cache"], mask[:, None, None])
            nxt = sample(logits[:, -1], temperature, top_p, top_k, u=bufs["u"].index_select(0, t)[0])  # (B,)
            bufs["out"].index_copy_(1, t, nxt[:, None])
            bufs["done"] |= bufs["is_stop"][nxt]
            return nxt

        store[B, S, setting, on, compile] = {
            W: (llama.Graphed(step, on, store.get("pool"), compile is not None, compile, width=1), bufs["slots"][:W])
            for W in range(WIDTH_STEP, S + 1, WIDTH_STEP)}
    return store[B, S], store[B, S, setting, on, compile]


def _shape(model, B, S, temperature, top_p, top_k, graph):  # -> the engine's (B, slots, setting, graphed)
    S = -(-S // (2 * WIDTH_STEP)) * 2 * WIDTH_STEP
    setting = (0.0, 1.0, 0) if temperature == 0 else (float(temperature), float(top_p), int(top_k))
    device = model.output.weight.device
    return B, S, setting, device.type == "cuda" if graph is None else bool(graph) and device.type == "cuda"


@torch.inference_mode()
def warm(model, batch, cache_len, temperature=1.0, top_p=1.0, top_k=0, graph=None, compile=None):
    """Runs every width's step of the engine that generate(..., batch=batch, cache_len=cache_len) uses once, so
    that its capture (and compile) happens now and not inside a later, timed call (for prompt + max_new <=
    cache_len). The steps write slots and columns that a call rewrites before it reads them."""
    bufs, steps = _engine(model, *_shape(model, batch, cache_len, temperature, top_p, top_k, graph), compile=compile)
    bufs["base"].zero_()
    for W, (step, ar) in steps.items():
        step(torch.full_like(bufs["base"], W - 2), ar)


@torch.inference_mode()
def generate(model, prompts, max_new, stop_ids, temperature=1.0, top_p=1.0, top_k=0, generator=None, on_tokens=None,
             batch=None, cache_len=0, graph=None, stats=None, shrink=True, compile=None):
    """Samples a continuation of every prompt (lists of ids) until a stop token or max_new tokens. Returns
    [(new ids without the stop token, stopped)]. batch: rows per engine batch (default: all prompts in one); prompts
    are cut into batches of that size and the last one padded with dummy rows, so that every call with the same batch
    and cache size reuses one engine (and its CUDA graphs). cache_len: the least cache size (rounded up to a multiple
    of 2 * WIDTH_STEP, and at least longest prompt + max_new): callers with prompts of several lengths pass one size.
    graph: capture the steps in CUDA graphs (default: on a GPU). on_tokens(new ids so far, a stop token included):
    called after every token, batch 1 only (it reads each token back). stats: a dict that gets "row_steps" (rows x
    steps computed, dummy rows included) and "tokens" (new tokens kept, stop tokens counted) added. compile: a
    torch.compile mode for the steps, or None."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise BeagleError("generate needs at least one prompt, and no empty prompt")
    if max_new < 1:
        raise BeagleError("max_new must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise BeagleError("temperature must be >= 0 and top_p in (0, 1]")
    B = batch or len(prompts)
    if len(prompts) > B:  # one engine batch at a time, in order (the generator's draws follow the same order)
        return [r for i in range(0, len(prompts), B) for r in generate(
            model, prompts[i:i + B], max_new, stop_ids, temperature, top_p, top_k, generator, on_tokens, B,
            cache_len, graph, stats, shrink, compile)]
    if on_tokens is not None and B != 1:
        raise BeagleError("on_tokens (streaming) needs batch 1")
    device = model.output.weight.device
    L = max(len(p) for p in prompts)
    B, S, setting, on = _shape(model, B, max(cache_len, L + max_new), temperature, top_p, top_k, graph)
    bufs, steps = _engine(model, B, S, setting, on, compile=compile)
    rows = list(prompts) + [prompts[0]] * (B - len(prompts))  # dummy rows: their outputs are dropped
    tokens = torch.zeros(B, L, dtype=torch.long)
    start = torch.tensor([L - len(p) for p in rows])
    for b, p in enumerate(rows):
        tokens[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
    bufs["start"].copy_(start)  # host -> device copies once per call, never per step
    bufs["base"].fill_(L)
    bufs["done"].zero_()
    bufs["is_stop"].zero_()
    stops = sorted(i for i in stop_ids if 0 <= i < model.args.vocab_size)
    if stops:
        bufs["is_stop"].index_fill_(0, torch.tensor(stops, device=device), True)
    if temperature > 0:
        bufs["u"][:max_new].uniform_(generator=generator)  # (max_new, B): this call's randomness, one kernel
    live = torch.arange(L, device=device) >= bufs["start"][:, None]  # (B, L) False on left padding
    tokens, logits, rows_per = tokens.to(device), [], max(1, PREFILL_TOKENS // L)
    for a in range(0, B, rows_per):  # the prefill in groups of rows, each into its rows of the cache (a view)
        part = bufs["cache"].rows(a, a + rows_per)
        mask = prefill_mask(live[a:a + rows_per])[:, None]  # (rows, 1, L, L)
        # (batch 1 is decoding, where every prompt has a new length: llama.any_length; a batch pays it once)
        with llama.any_length() if B == 1 else contextlib.nullcontext():
            logits.append(model(tokens[a:a + rows_per], bufs["slots"][:L], part, mask, last_only=True)[0][:, -1])
    first = sample(torch.cat(logits), *setting, u=bufs["u"][0])
    bufs["out"][:, 0] = first
    bufs["done"] |= bufs["is_stop"][first]
    bufs["done"][len(prompts):] = True  # dummy rows count as finished: they go at the first shrink
    pos = bufs["base"].clone()  # (1,) on the device, advanced in place: no host-to-device copy per step
    rows_of, finished, row_steps, t = list(range(B)), {}, B, 0  # rows_of[r]: the prompt engine row r holds
    while t + 1 < max_new:
        if on_tokens is not None:  # streaming: read each token back (batch 1, so the stop check is exact too)
            new = bufs["out"][0, :t + 1].tolist()
            on_tokens(new)
            if new[-1] in stop_ids:
                break
        elif t % CHECK_EVERY == 0:
            live = int((~bufs["done"]).sum())  # the one host read of CHECK_EVERY steps
            if live == 0:
                break
            if shrink and live <= B // 2:  # move the unfinished rows into a batch of half the size (or less)
                B2 = B // 2
                while live <= B2 // 2:
                    B2 //= 2
                keep = torch.sort(bufs["done"].to(torch.uint8), stable=True).indices  # unfinished rows first
                gone = keep[B2:]  # finished rows that leave: their tokens now, in one read
                for r, row in zip(gone.tolist(), bufs["out"].index_select(0, gone)[:, :t + 1].tolist()):
                    finished[rows_of[r]] = row
                keep = keep[:B2]
                small, steps = _engine(model, B2, S, setting, on, parent=bufs, compile=compile)
                for layer in range(model.args.n_layers):  # gather first, then copy: overlapping rows are safe
                    small["cache"].kv[layer].copy_(bufs["cache"].kv[layer].index_select(0, keep))
                for name in ("start", "done"):
                    small[name].copy_(bufs[name].index_select(0, keep))
                small["out"].copy_(bufs["out"].index_select(0, keep))
                small["u"].copy_(bufs["u"].index_select(1, keep))  # each row keeps its own uniforms
                small["base"].copy_(bufs["base"])
                small["is_stop"].copy_(bufs["is_stop"])
                rows_of, bufs, B = [rows_of[r] for r in keep.tolist()], small, B2
        step, ar = steps[-(-(L + t + 1) // WIDTH_STEP) * WIDTH_STEP]  # the width that holds slots 0 .. L + t
        step(pos, ar)
        pos += 1
        t += 1
        row_steps += B
    else:  # the cap: the last token has not been shown yet
        if on_tokens is not None:
            on_tokens(bufs["out"][0, :t + 1].tolist())
    for r, row in enumerate(bufs["out"][:, :t + 1].tolist()):
        finished[rows_of[r]] = row
    results = []
    for b in range(len(prompts)):
        row = finished[b]
        end = next((j for j, x in enumerate(row) if x in stop_ids), None)
        results.append((row if end is None else row[:end], end is not None))
    if stats is not None:
        stats["row_steps"] = stats.get("row_steps", 0) + row_steps
        stats["tokens"] = stats.get("tokens", 0) + sum(len(r) + s for r, s in results)
    return results


# -----------------------------------------------------------------------------
# self-distillation data (Magpie): the target writes the user turn from the bare user-turn prefix of its own chat
# template, then answers it. The draft then learns on text the target itself finds likely.

SENTINEL = "\x00BEAGLE_USER_TURN\x00"  # no whitespace, so templates that trim the content keep it whole


def check_config(cfg):
    """Every option's range and --out's kind, before the target is loaded: one line naming the option."""
    common.check_at_least(cfg, dict.fromkeys(("conversations", "batch_size", "turns", "max_user_tokens",
                                              "max_reply_tokens"), 1))
    for name in ("user_temperature", "reply_temperature"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise BeagleError(f"--{name.replace('_', '-')} must be a finite number >= 0 (0: greedy), "
                              f"got {getattr(cfg, name)}")
    if not 0 < cfg.top_p <= 1:
        raise BeagleError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise BeagleError(f"--top-k must be >= 0 (0: off), got {cfg.top_k}")
    if not 0 <= cfg.seed < 2 ** 32:  # (batch i's generator is seeded with seed * 1_000_003 + i: a 64-bit number)
        raise BeagleError(f"--seed must be in [0, 2^32), got {cfg.seed}")
    if cfg.compile not in ("", "default", "max-autotune-no-cudagraphs"):  # (the others make graphs of their own)
        raise BeagleError(f"--compile must be default or max-autotune-no-cudagraphs (or empty), got {cfg.compile!r}")
    common.check_output(cfg.out, "--out")
    check_own(cfg.out)


OWN = b'{"conversations": '  # how every line this script writes starts (json.dumps of its records)


def check_own(path):
    """An existing --out is continued (appended to, a half-written last line cut): it must hold lines this script
    wrote, nothing else; a user's other file is refused, never cut nor appended to."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        bad = next((i for i, line in enumerate(f, 1) if line.strip() and not line.startswith(OWN)), None)
    if bad is not None:
        raise BeagleError(f"--out {path} exists and line {bad} is not one generate.py writes: give a new file "
                          "(a restarted run continues only its own file)")


def user_prefix(tokenizer, conv):
    """The text the template puts before the content of the next user turn (after conv), e.g. for ChatML
    '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n'."""
    text = tokenizer.render(conv + [{"role": "user", "content": SENTINEL}], add_generation_prompt=False)
    if SENTINEL not in text:
        raise BeagleError("the chat template does not render the user's content verbatim")
    return text[:text.index(SENTINEL)]


def _resume(path):
    """-> (conversations already in `path`, their normalised first user turns, the batch to continue from). Cuts a
    line left half-written by an interrupted run. The last batch in the file may have been cut at --conversations: it is
    generated again (the same conversations: a batch is a function of (seed, batch index)), and those of its
    conversations already in the file are skipped as repeats."""
    if not os.path.exists(path):
        return 0, set(), 0
    with open(path, "rb") as f:
        raw = f.read()
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        raw = raw[:raw.rfind(b"\n") + 1]
    count, seen, last = 0, set(), 0
    for line in raw.decode("utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        conv = data.normalise(record)
        if conv:
            count += 1
            seen.add(data.norm_text(next(m["content"] for m in conv if m["role"] == "user")))
            last = record["batch"] if isinstance(record.get("batch"), int) else last
    return count, seen, last


def _batch(cfg, model, tokenizer, index, questions, special, cache_len):
    """Batch `index` of the generator: its conversations [[{role, content}]] (filtered inside the batch only, so
    that it depends on (seed, index) alone: ranks can make batches independently), drop counts and token counts.
    A conversation keeps its good exchanges when a later question or reply fails the filters."""
    device = model.output.weight.device
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + index)
    B, stats, drops, firsts = cfg.batch_size, {}, Counter(), set()
    convs, rows, ended = [[] for _ in range(B)], list(range(B)), []  # rows: conversations still growing
    truncated = 0
    for turn in range(cfg.turns):
        for role in ("user", "assistant"):
            if not rows:
                break
            if role == "user":  # the target continues its template's bare user header: it writes a question
                prompts = [tokenizer.encode(user_prefix(tokenizer, convs[i])) for i in rows]
                cap, temperature = cfg.max_user_tokens, cfg.user_temperature
            else:
                prompts = [tokenizer.chat(convs[i], add_generation_prompt=True) for i in rows]
                cap, temperature = cfg.max_reply_tokens, cfg.reply_temperature
            # one engine batch per phase (fewer rows than B are padded): one cache and set of graphs for all phases
            outs = generate(model, prompts, cap, tokenizer.stop_ids, temperature, cfg.top_p, cfg.top_k, gen,
                            batch=B, cache_len=cache_len, graph=cfg.cuda_graph, stats=stats, shrink=cfg.shrink,
                            compile=cfg.compile or None)
            kept = []
            for i, (toks, stopped) in zip(rows, outs):
                text = tokenizer.decode(toks).strip()
                key = data.norm_text(text)
                # a question cut by the cap is dropped; a reply cut by the cap is kept and ends the conversation:
                # the draft learns the target's own distribution at every position (soft targets), so a
                # truncated reply teaches nothing false, and dropping it wastes the compute
                why = ("nostop" if not stopped and role == "user" else "empty" if not text else
                       "special" if special & set(tokenizer.encode(text)) else None)
                if why is None and role == "user" and turn == 0:
                    why = ("duplicate" if key in firsts else
                           "mtbench" if questions is not None and key in questions else None)
                    firsts.add(key)
                if why:
                    drops[why] += 1
                    if role == "assistant":
                        convs[i].pop()  # its question goes too: a conversation ends with a reply
                    if convs[i]:
                        ended.append(i)  # earlier exchanges stay
                    continue
                convs[i].append({"role": role, "content": text})
                if stopped or role == "user":
                    kept.append(i)
                else:
                    truncated += 1
                    ended.append(i)
            rows = kept
    done = sorted(ended + rows)
    return {"index": index, "convs": [convs[i] for i in done], "drops": drops, "truncated": truncated,
            "tokens": stats["tokens"], "row_steps": stats["row_steps"]}


def _gather(obj, world):
    """Every rank's obj, in rank order (one all_gather per round of batches; gloo, so objects stay on the host)."""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def generate_conversations(cfg, model, tokenizer, verbose=True, rank=0, world=1):
    """Appends conversations to cfg.out until it holds n = cfg.conversations. Batch i is made by rank i % world from a
    generator seeded by (seed, i), so its conversations do not depend on the number of ranks nor on a restart.
    Ranks work in rounds of `world` batches; after each round every rank gathers the round's conversations and
    rank 0 appends them in batch order, dropping first user turns seen before (in the file or an earlier batch),
    up to n: one rank and several ranks write the same file, and a restart continues it as if never stopped."""
    check_config(cfg)
    count, seen, index = _resume(cfg.out)
    questions = data.mtbench_questions()
    special = set(tokenizer.stop_ids) | {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    # one cache size for every phase and turn (a bound on the longest prompt + cap; a longer one gets its own)
    header = len(tokenizer.chat([{"role": "user", "content": "x"}], add_generation_prompt=True))
    cache_len = cfg.turns * (header + cfg.max_user_tokens + cfg.max_reply_tokens)
    if cache_len > model.args.max_seq_len:  # (a longer conversation would run past the positions RoPE knows)
        raise BeagleError(f"--turns {cfg.turns} x ({header} template tokens + --max-user-tokens {cfg.max_user_tokens} "
                          f"+ --max-reply-tokens {cfg.max_reply_tokens}) = {cache_len} tokens, more than the target's "
                          f"context ({model.args.max_seq_len}): lower them")
    if rank == 0:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    drops, barren = Counter(), 0
    n = cfg.conversations
    bar = tqdm(total=n, initial=min(count, n), disable=not verbose or rank > 0, unit="conv")
    while count < n:
        t0 = time.time()
        mine = _batch(cfg, model, tokenizer, index + rank, questions, special, cache_len)
        mine["seconds"] = time.time() - t0
        for r in _gather(mine, world):  # batch order = rank order within a round
            drops += r["drops"]
            new = []
            for conv in r["convs"]:
                key = data.norm_text(conv[0]["content"])
                if count + len(new) < n and key not in seen:
                    new.append(conv)
                    seen.add(key)
                elif key in seen:
                    drops["duplicate"] += 1
            if rank == 0 and new:
                with open(cfg.out, "a", encoding="utf-8") as f:  # one append + fsync per batch: a crash loses one
                    for conv in new:
                        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                 for m in conv]
                        f.write(json.dumps({"conversations": turns, "batch": r["index"]}, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            count += len(new)
            barren = 0 if new else barren + 1
            bar.update(len(new))
            if verbose and rank == 0:
                bar.write(f"batch {r['index'] + 1:4d} | kept {len(new):4d}/{cfg.batch_size} | total {count}/{n} | "
                          + f"truncated replies {r['truncated']} | dropped: "
                          + " ".join(f"{k} {drops[k]}" for k in ("nostop", "empty", "special", "duplicate", "mtbench"))
                          + f" | idle rows {1 - r['tokens'] / r['row_steps']:.0%}"
                          + f" | {r['tokens'] / r['seconds']:.0f} tok/s")
            if count >= n:
                break
            if barren >= 20:
                raise BeagleError(f"20 batches in a row produced no usable conversation (dropped so far: "
                                  f"{dict(drops)}); raise --max-user-tokens/--max-reply-tokens or check the target")
        index += world
    bar.close()
    return drops


# -----------------------------------------------------------------------------

def main(cfg):
    """Under torchrun (WORLD_SIZE > 1) every rank generates its share of the batches on its own GPU (cuda:LOCAL_RANK)
    and the ranks exchange finished conversations over gloo (host objects, a few per batch)."""
    check_config(cfg)
    device, dtype = common.device_and_dtype(cfg.device, cfg.dtype)
    with common.ranks(device, "gloo") as (rank, world, device):
        torch.manual_seed(cfg.seed)
        model, tokenizer = convert.load_target(cfg.target, device=device, dtype=dtype)
        model.eval()
        generate_conversations(cfg, model, tokenizer, rank=rank, world=world)
        if rank == 0:
            data.load_conversations(cfg.out)  # the summary line, from the file as train.py will read it


if __name__ == "__main__":
    try:
        main(common.cli(GenConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # every finished batch is in --out already
        sys.exit("interrupted: run the same command again to continue --out")