"""Tests for data.py (CPU, fast): python -m pytest -q test_data.py"""
import json

import pytest
import torch

import data
from llama import BeagleError


class DataCharTokenizer:
    """Stand-in tokenizer with the Tokenizer API of COMMON.md: one id per latin-1 character plus ChatML special
    tokens, SmolLM2's chat template (default system prompt). prefix_space=True prepends a marker token to every
    encode() like SentencePiece does, so encoding pieces separately does not reproduce the full encoding."""
    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "\u2581"]

    def __init__(self, prefix_space=False):
        self.prefix_space = prefix_space
        self.vocab_size = 256 + len(self.SPECIAL)
        self.eos_id, self.bos_id, self.pad_id = 0, 1, 0
        self.stop_ids = {0, 2}

    def encode(self, text):
        ids, i = ([3] if self.prefix_space else []), 0
        while i < len(text):
            for j, s in enumerate(self.SPECIAL[:3]):
                if text.startswith(s, i):
                    ids.append(j)
                    i += len(s)
                    break
            else:
                ids.append(len(self.SPECIAL) + min(ord(text[i]), 255))
                i += 1
        return ids

    def decode(self, ids):
        return "".join(self.SPECIAL[i] if i < len(self.SPECIAL) else chr(i - len(self.SPECIAL)) for i in ids
                       if not (self.prefix_space and i == 3))

    def render(self, messages, add_generation_prompt=True):
        out = ""
        for k, m in enumerate(messages):
            if k == 0 and m["role"] != "system":
                out += "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render(messages, add_generation_prompt))


def _data_write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# -----------------------------------------------------------------------------
# reading


def test_data_load_sharegpt_jsonl_and_json(tmp_path):
    recs = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}]},
        {"conversations": [{"from": "gpt", "value": "greeting"}, {"from": "human", "value": "q\u2028\x85q"},
                           {"from": "chatgpt", "value": "a"}, {"from": "human", "value": "unanswered"}]},
    ]
    recs.append({"conversations": [{"from": "human", "value": " a "}, {"from": "gpt", "value": "b\n"},
                                   {"from": "human", "value": "c"}, {"from": "human", "value": "d"},
                                   {"from": "gpt", "value": "e"}]})  # a repeated role: the prefix before it
    bad = ['{"conversations": [{"from": "alien", "value": "x"}]}',  # unknown role
           '{"conversations": [{"from": "human", "value": 3}]}',  # content not a string
           '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}',  # empty reply
           '{"conversations": []}', '{"other": 1}', '[1, 2]', 'not json at all', '']
    jl = _data_write(tmp_path, "a.jsonl", "\n".join([json.dumps(r, ensure_ascii=False) for r in recs] + bad) + "\n")
    js = _data_write(tmp_path, "a.json", json.dumps(recs + [{"conversations": "nope"}]))
    for path in (jl, js):
        convs = data.load_conversations(path, verbose=False)
        assert len(convs) == 4
        assert convs[3] == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        assert convs[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}]
        assert [m["role"] for m in convs[1]] == ["user", "assistant", "user", "assistant"]
        # the leading bot greeting and the trailing unanswered question are trimmed
        assert convs[2] == [{"role": "user", "content": "q\u2028\x85q"}, {"role": "assistant", "content": "a"}]


def test_data_load_errors(tmp_path, capsys):
    with pytest.raises(BeagleError, match="not found"):
        data.load_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(BeagleError, match="no usable conversation"):
        data.load_conversations(_data_write(tmp_path, "b.jsonl", '{"x": 1}\nbroken\n'))
    assert "skipped 2 empty/malformed" in capsys.readouterr().out
    with pytest.raises(BeagleError, match="not valid JSON"):
        data.load_conversations(_data_write(tmp_path, "c.json", '[{"conversations": '))


def test_data_mtbench_guard(tmp_path, capsys):
    questions = data.mtbench_questions()
    assert questions is not None and len(questions) >= 80  # the evaluator package is installed here
    q = next(iter(sorted(questions)))
    recs = [{"conversations": [{"from": "human", "value": "  " + q.replace(" ", "  ") + "\n"},
                               {"from": "gpt", "value": "answer"}]},
            {"conversations": [{"from": "human", "value": q + " Please."}, {"from": "gpt", "value": "answer"}]}]
    convs = data.load_conversations(_data_write(tmp_path, "m.jsonl", "\n".join(map(json.dumps, recs))))
    assert len(convs) == 1 and convs[0][0]["content"].endswith("Please.")  # only the exact match is dropped
    assert "dropped 1 MT-bench" in capsys.readouterr().out
    assert data.is_mtbench([{"role": "user", "content": q}], questions)
    assert not data.is_mtbench([{"role": "user", "content": q}], None)  # guard off without the package


# -----------------------------------------------------------------------------
# tokenization


def _data_check_mask(tok, msgs, ids, mask):
    """The masked tokens decode to exactly the assistant contents, each followed by its end-of-turn token."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    want = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [w + "<|im_end|>" for w in want]


@pytest.mark.parametrize("prefix_space", [False, True])
def test_data_tokenize_mask_standin(prefix_space):
    tok = DataCharTokenizer(prefix_space)
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "ok\nsure"}]
    ids, mask = data.tokenize(tok, msgs, max_len=1000)
    assert ids == tok.encode(tok.render(msgs, add_generation_prompt=False)) and len(mask) == len(ids)
    _data_check_mask(tok, msgs, ids, mask)
    ids2, mask2 = data.tokenize(tok, msgs, max_len=20)
    assert ids2 == ids[:20] and mask2 == mask[:20]


def test_data_tokenize_rejects_unstable_template():
    class Reordering(DataCharTokenizer):  # renders the last message first: not prefix-stable
        def render(self, messages, add_generation_prompt=True):
            return super().render(messages[::-1], add_generation_prompt)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(BeagleError, match="prefix"):
        data.tokenize(Reordering(), msgs, 100)
    with pytest.raises(BeagleError, match="no conversation survived"):
        data.tokenize_all(Reordering(), [msgs], 100, verbose=False)


# -----------------------------------------------------------------------------
# batches


def _data_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = int(torch.randint(3, 40, (1,), generator=g))
        out.append(([i] + torch.randint(1, 100, (T - 1,), generator=g).tolist(),
                    (torch.rand(T, generator=g) < 0.5).tolist()))
    return out


def test_data_batches_cover_pad_and_repeat():
    ex = _data_examples(203)
    epoch0 = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1))
    assert len(epoch0) == len(data.batch_plan([len(i) for i, _ in ex], 8, seed=1, epoch=0)) == 26
    seen = []
    for ids, loss_mask, valid in epoch0:
        assert ids.dtype == torch.long and loss_mask.dtype == valid.dtype == torch.bool
        assert ids.shape == loss_mask.shape == valid.shape and ids.shape[0] <= 8
        assert valid[:, 0].all() and valid.sum(1).max() == ids.shape[1]  # padded to the longest only
        for b in range(ids.shape[0]):
            n = int(valid[b].sum())
            assert valid[b, :n].all() and not valid[b, n:].any()  # right padding
            assert (ids[b, n:] == -1).all() and not loss_mask[b, n:].any()
            x, m = ex[int(ids[b, 0])]
            assert ids[b, :n].tolist() == x and loss_mask[b, :n].tolist() == m
            seen.append(int(ids[b, 0]))
    assert sorted(seen) == list(range(203))  # every example exactly once
    again = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))  # deterministic
    skipped = list(data.batches(ex, 8, seed=1, epoch=0, pad_id=-1, skip=5))
    assert len(skipped) == 21 and all(torch.equal(a[0], b[0]) for a, b in zip(epoch0[5:], skipped))
    epoch1 = list(data.batches(ex, 8, seed=1, epoch=1, pad_id=-1))
    assert [b[0][:, 0].tolist() for b in epoch1] != [b[0][:, 0].tolist() for b in epoch0]
    # length grouping: much less padding than a random order
    pad = sum(int((~v).sum()) for _, _, v in epoch0)
    rand_pad = sum(int((~v).sum()) for _, _, v in data.batches(ex, 8, shuffle=False))
    assert pad < rand_pad / 2


def test_data_split_deterministic():
    ex = _data_examples(100)
    tr, ho = data.split(ex, 0.1, seed=3)
    assert len(ho) == 10 and len(tr) == 90
    assert sorted(e[0][0] for e in tr + ho) == list(range(100))
    assert data.split(ex, 0.1, seed=3) == (tr, ho) and data.split(ex, 0.1, seed=4) != (tr, ho)
    assert data.split(ex, 0.0) == (ex, [])


# -----------------------------------------------------------------------------
# sampling, batched generation, self-distillation data


def _data_tiny_target(vocab, stopping=False, seed=0):
    """A tiny random Llama. stopping=True: its end-of-turn token (id 2 in both tokenizers) wins right after
    any token id = 1 mod 5 and never elsewhere (eos, id 0, never wins), so turns end after ~5 tokens, never
    right after a turn header's "\n", and sometimes run past a small cap; the ids differ per row, so rows of a
    batch stop at different steps."""
    from llama import ModelArgs, Transformer

    class StoppingTarget(Transformer):
        def forward(self, tokens, *args, **kwargs):
            logits, h = super().forward(tokens, *args, **kwargs)
            logits[..., 0] = -30.0
            logits[..., 2] = torch.where(tokens % 5 == 1, 30.0, -30.0)
            return logits, h

    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128)
    return (StoppingTarget if stopping else Transformer)(args).eval()


def test_data_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    assert torch.equal(data.sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(data.sample(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(data.sample(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))
    # top-k 3 and top-p: samples stay in the allowed set and follow the renormalised distribution
    row = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(20000, 1)
    counts = torch.bincount(data.sample(row, 1.0, top_k=3, generator=g), minlength=5).float() / 20000
    want = torch.tensor([2.0, 1.0, 0.5]).softmax(-1)
    assert counts[3:].sum() == 0 and (counts[:3] - want).abs().max() < 0.02
    p = row[0].softmax(-1)  # top_p just above p0 + p1 keeps exactly three tokens
    counts = torch.bincount(data.sample(row, 1.0, top_p=float(p[:2].sum()) + 1e-3, generator=g), minlength=5)
    assert counts[3:].sum() == 0 and (counts[:3].float() / 20000 - want).abs().max() < 0.02


def _data_greedy_reference(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):  # full forward without cache at positions 0..n-1: the plainest possible decoding
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_data_batched_greedy_equals_unbatched():
    model = _data_tiny_target(260)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 260, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    outs = data.generate(model, prompts, 10, stop_ids=set(), temperature=0.0)
    for p, (toks, stopped) in zip(prompts, outs):
        assert not stopped and toks == _data_greedy_reference(model, p, 10)
    # with stop tokens: each row ends at its own first stop, others keep going
    ref = [_data_greedy_reference(model, p, 10) for p in prompts]
    stop = {ref[1][3], ref[3][0]}
    for (toks, stopped), r in zip(data.generate(model, prompts, 10, stop_ids=stop, temperature=0.0), ref):
        cut = next((j for j, x in enumerate(r) if x in stop), None)
        assert (toks, stopped) == ((r, False) if cut is None else (r[:cut], True))


def test_data_prefill_mask():
    live = torch.tensor([[False, False, True, True, True], [True] * 5])
    m = data.prefill_mask(live)
    assert m.any(-1).all()  # every query row sees a key: no NaN from SDPA
    for b in range(2):
        for i in range(5):
            for j in range(5):  # real queries: causal over real keys; pad queries: only themselves
                want = (j <= i and bool(live[b, j])) if live[b, i] else i == j
                assert bool(m[b, i, j]) == want


def test_data_user_prefix():
    tok = DataCharTokenizer()
    assert data.user_prefix(tok, []) == "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n"
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert data.user_prefix(tok, conv) == tok.render(conv, False) + "<|im_start|>user\n"


def test_data_generate_conversations_resume(tmp_path, monkeypatch):
    tok, model = DataCharTokenizer(), _data_tiny_target(260, stopping=True)
    out = str(tmp_path / "gen" / "self.jsonl")
    cfg = data.GenConfig(out=out, n=5, batch_size=8, max_user_tokens=12, max_reply_tokens=12, seed=0)
    drops = data.generate_conversations(cfg, model, tok, verbose=False)
    assert drops["nostop"] > 0  # some rows do hit the caps, and are dropped
    lines = open(out).read().split("\n")[:-1]
    assert len(lines) == 5
    for line in lines:
        conv = json.loads(line)["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] and all(t["value"].strip() for t in conv)
        assert all(t["value"] == t["value"].strip() for t in conv)
    with open(out, "a") as f:
        f.write('{"conversations": [{"from": "hum')  # a line cut by a crash
    cfg.n, cfg.turns = 9, 2
    data.generate_conversations(cfg, model, tok, verbose=False)
    lines2 = open(out).read().split("\n")[:-1]
    assert lines2[:5] == lines and len(lines2) == 9
    assert [len(json.loads(x)["conversations"]) for x in lines2[5:]] == [4] * 4
    convs = data.load_conversations(out, verbose=False)
    firsts = [c[0]["content"] for c in convs]
    assert len(convs) == 9 and len(set(firsts)) == 9  # no duplicate user turns
    data.generate_conversations(cfg, model, tok, verbose=False)  # already complete: nothing added
    assert open(out).read().split("\n")[:-1] == lines2
    # the MT-bench guard: pretend the first generated question is an MT-bench one; a rerun with the same seed
    # into a fresh file drops it
    monkeypatch.setattr(data, "mtbench_questions", lambda: {data._norm_text(firsts[0])})
    cfg2 = data.GenConfig(out=str(tmp_path / "g2.jsonl"), n=5, batch_size=8, max_user_tokens=12,
                          max_reply_tokens=12, seed=0)
    assert data.generate_conversations(cfg2, model, tok, verbose=False)["mtbench"] == 1
    assert firsts[0] not in [c[0]["content"] for c in data.load_conversations(cfg2.out, verbose=False)]


def test_data_generate_gives_up_on_barren_target(tmp_path):
    tok, model = DataCharTokenizer(), _data_tiny_target(260)  # random: no turn ends within 1 token
    cfg = data.GenConfig(out=str(tmp_path / "x.jsonl"), n=2, batch_size=2, max_user_tokens=1, max_reply_tokens=1,
                         user_temperature=0.0)
    with pytest.raises(BeagleError, match="no usable conversation"):
        data.generate_conversations(cfg, model, tok, verbose=False)


# -----------------------------------------------------------------------------
# offline state cache


def test_data_cache_states_roundtrip(tmp_path):
    model = _data_tiny_target(260)
    ex = [(ids[1:], m[1:]) for ids, m in _data_examples(11)]
    ex = [([t % 260 for t in ids], m) for ids, m in ex]
    data.cache_states(model, ex, str(tmp_path / "c"), batch_size=4, shard_bytes=2000)
    states = data.CachedStates(str(tmp_path / "c"), ex)
    assert len(states.index["shards"]) > 1
    for i, (ids, _) in enumerate(ex):
        _, h = model(torch.tensor([ids]))
        x = states[i]
        assert x.dtype == torch.float16 and x.shape == (len(ids), 64)
        torch.testing.assert_close(x.float(), h[0].detach(), atol=2e-2, rtol=1e-2)
    for (a, m, v), (a2, m2, v2, h) in zip(data.batches(ex, 4, seed=2), data.state_batches(ex, states, 4, seed=2)):
        assert torch.equal(a, a2) and torch.equal(v, v2) and h.shape == (*a.shape, 64)
        assert (h[~v] == 0).all() and (h[v].abs().sum(-1) > 0).all()
    with pytest.raises(BeagleError, match="other examples"):
        data.CachedStates(str(tmp_path / "c"), ex[:-1] + [([1, 2, 3], [True] * 3)])
    with pytest.raises(BeagleError, match="no complete state cache"):
        data.CachedStates(str(tmp_path / "nothing"), ex)


# -----------------------------------------------------------------------------
# the real SmolLM2 tokenizer and chat template (converted once from the pip-installed GGUF; tokenizer only)


@pytest.fixture(scope="module")
def data_smol_tokenizer():
    import llama
    if not (llama.default_target_dir() / "config.json").exists():
        llama.load_target()  # converts the GGUF into the cache, once
    return llama.Tokenizer(llama.default_target_dir())


def test_data_tokenize_mask_smollm2(data_smol_tokenizer):
    tok = data_smol_tokenizer
    convs = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "Quatre."}, {"role": "user", "content": "Et 3+3 ?"},
         {"role": "assistant", "content": "Six, évidemment 😀\n\n- item\n- item"}],
        [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "```python\nprint(1)\n```"},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": ""}],
    ]
    for msgs in convs:
        ids, mask = data.tokenize(tok, msgs, 4096)
        assert ids == tok.chat(msgs, add_generation_prompt=False)
        _data_check_mask(tok, msgs, ids, mask)
        # exactly the content tokens + <|im_end|>: the header "<|im_start|>assistant\n" and the "\n" after are out
        im_end = tok.encode("<|im_end|>")[0]
        n_want = sum(len(tok.encode(m["content"])) + 1 for m in msgs if m["role"] == "assistant")
        assert sum(mask) == n_want and im_end in tok.stop_ids
    # the default system prompt SmolLM2 inserts is not in the loss
    ids, mask = data.tokenize(tok, convs[0], 4096)
    assert "SmolLM" in tok.decode(ids) and "SmolLM" not in tok.decode([i for i, m in zip(ids, mask) if m])
    # a token that straddles the header and the content: rejected, never silently misaligned
    with pytest.raises(BeagleError, match="straddles"):
        data.tokenize(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nx"}], 4096)
    assert data.user_prefix(tok, []).endswith("<|im_end|>\n<|im_start|>user\n")


def test_data_cli_end_to_end(tmp_path, monkeypatch, data_smol_tokenizer, capsys):
    """python data.py --out ... through llama.cli, with a tiny random target behind the real tokenizer."""
    import llama
    model = _data_tiny_target(data_smol_tokenizer.vocab_size, stopping=True)
    monkeypatch.setattr(llama, "load_target", lambda path, device, dtype: (model, data_smol_tokenizer))
    out = tmp_path / "sg.jsonl"
    cfg = llama.cli(data.GenConfig, ["--out", str(out), "--n=6", "--batch-size", "8", "--max-user-tokens", "10",
                                     "--max-reply-tokens=10", "--device", "cpu", "--reply-temperature", "0"])
    assert cfg.n == 6 and cfg.reply_temperature == 0.0 and cfg.target is None
    data.main(cfg)
    printed = capsys.readouterr()
    assert "batch    1 | kept" in printed.err + printed.out and f"{out}: 6 conversations" in printed.out
    convs = data.load_conversations(str(out), verbose=False)
    ex = data.tokenize_all(data_smol_tokenizer, convs, 256, verbose=False)
    assert len(ex) == 6 and all(any(m) for _, m in ex)
    with pytest.raises(BeagleError, match="must be >= 1"):
        data.main(llama.cli(data.GenConfig, ["--out", str(out), "--device", "cpu", "--turns", "0"]))
    with pytest.raises(BeagleError, match="--dtype"):
        data.main(llama.cli(data.GenConfig, ["--out", str(out), "--device", "cpu", "--dtype", "int8"]))
