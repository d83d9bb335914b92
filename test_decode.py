"""
Tests of decode.py (CPU, fp32 unless said otherwise):

    python -m pytest -q test_decode.py

Tiny random Llamas for most checks; the tests named *_real_* use the default SmolLM2-135M-Instruct target
(llama.load_target(), converted once from the pip-installed GGUF) and are the slow ones.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import decode
import llama
from beagle import Beagle, DraftArgs, save_draft
from llama import KVCache
from decode import DecodeConfig, DraftCache, generate_ar, generate_spec
from llama import BeagleError, ModelArgs, Transformer

DECODE_HERE = Path(__file__).resolve().parent


@pytest.fixture
def decode_one_thread():
    """Tiny models are all per-op overhead: one thread avoids the spin-waits of the second on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def decode_tiny_target(vocab=48, seed=0, sharp=3.0, dtype=torch.float32):
    """A tiny random Llama; `sharp` scales the LM head so its distributions are peaked like a real model's."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128, max_seq_len=256)
    target = Transformer(args).to(dtype).eval()
    with torch.no_grad():
        target.output.weight.mul_(sharp)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def decode_random_draft(target, seed=1):
    torch.manual_seed(seed)
    return Beagle(DraftArgs.from_target(target.args)).to(target.output.weight.dtype).eval()


def decode_train_draft(target, seqs, steps=60, lr=1e-3, seed=1):
    """A briefly trained draft: the paper's regression loss alone (hat_h_i -> h_i, query i over the true states
    of positions < i, i.e. draft step 1), on the target states of `seqs` computed once. No LM head in the loop,
    so it is cheap even for the real target, and hat_h ~ h makes the LM head agree."""
    draft = decode_random_draft(target, seed).train()
    opt = torch.optim.Adam(draft.parameters(), lr=lr)
    with torch.no_grad():
        data = [(target.tok_embeddings(x[None]), target(x[None])[1]) for x in seqs]
    for step in range(steps):
        emb, h = data[step % len(data)]
        pos = torch.arange(h.shape[1])
        hat = draft(emb, pos, h, pos, (pos[None, :] < pos[:, None])[None, None])  # query i sees keys j < i
        loss = F.mse_loss(hat[:, 1:], h[:, 1:])  # query 0 sees no key
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


def decode_cfg(**kw):
    return DecodeConfig(**{"depth": 4, "top_k": 3, "tree_tokens": 10, "max_new_tokens": 40, **kw})


# -----------------------------------------------------------------------------
# greedy speculative decoding == plain greedy decoding, token for token

DECODE_SETTINGS = [  # (mode, depth, top_k, tree_tokens)
    ("chain", 1, 0, 0), ("chain", 3, 0, 0), ("chain", 6, 0, 0),
    ("tree", 1, 3, 3), ("tree", 2, 2, 3), ("tree", 4, 3, 10), ("tree", 5, 10, 60), ("tree", 3, 60, 200),
]


@pytest.fixture(scope="module")
def decode_tiny():
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    target = decode_tiny_target()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (L,), generator=g).tolist() for L in (1, 5, 12)]
    # training data: the target's own greedy continuations, where drafting happens
    seqs = [torch.tensor(p + generate_ar(target, p, decode_cfg(max_new_tokens=48), set()).tokens) for p in prompts]
    seqs += [torch.randint(0, 48, (40,), generator=g) for _ in range(4)]
    trained = decode_train_draft(target, seqs)
    torch.set_num_threads(n_threads)
    return target, prompts, decode_random_draft(target), trained


def test_decode_greedy_spec_equals_plain_tiny(decode_tiny, monkeypatch, decode_one_thread):
    target, prompts, random_draft, trained_draft = decode_tiny
    moves = []
    real_move = KVCache.move
    monkeypatch.setattr(KVCache, "move", lambda self, src, dst: (moves.append(1), real_move(self, src, dst)))
    accepted, mid_stops = {"random": [], "trained": []}, 0
    for prompt in prompts:
        for max_new in (1, 37):
            plain = generate_ar(target, prompt, decode_cfg(max_new_tokens=max_new), set()).tokens
            assert len(plain) == max_new
            # a stop token met mid-answer (its first occurrence at index 5 or later) must end the answer there
            late = [t for i, t in enumerate(plain) if i >= 5 and t not in plain[:i]]
            stop = late[0] if late else None
            mid_stops += stop is not None
            for stops in ([set(), {stop}] if stop is not None else [set()]):
                want = generate_ar(target, prompt, decode_cfg(max_new_tokens=max_new), stops).tokens
                assert want == (plain[:plain.index(stop) + 1] if stops else plain)
                for mode, depth, top_k, tree_tokens in DECODE_SETTINGS:
                    cfg = decode_cfg(mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens,
                                     max_new_tokens=max_new)
                    for name, draft in (("random", random_draft), ("trained", trained_draft)):
                        r = generate_spec(target, draft, prompt, cfg, stops)
                        assert r.tokens == want, (name, mode, depth, top_k, tree_tokens, prompt, stops)
                        assert r.target_forwards == 1 + len(r.accepted_lengths)
                        assert all(0 <= m <= depth for m in r.accepted_lengths)
                        accepted[name] += r.accepted_lengths
    # the paths exercised: rejections, partial and deep acceptances, and KV moves of non-contiguous tree paths
    for name in accepted:
        assert 0 in accepted[name] and max(accepted[name]) >= 3, (name, accepted[name])
    assert sum(accepted["trained"]) > sum(accepted["random"])  # training the draft did something
    assert moves and mid_stops >= 2


# -----------------------------------------------------------------------------
# the pieces against slow references built from their definitions

def decode_ref_tree(target, draft, h, n, root, depth, top_k, keep):
    """EAGLE-2 tree drafting, one node at a time: each node's draft state is computed from scratch over the true
    keys + the draft states of its ancestors (each at its own position). Node 0 = the root (position n)."""
    tk, tv = draft.kv(h[:, :n], torch.arange(n))
    nodes, hats = [dict(token=root, score=0.0, parent=-1, depth=0)], {}  # the pool, in creation order

    def expand(i):  # node i queries; its top-k children join the pool
        anc, j = [], nodes[i]["parent"]
        while j >= 0:
            anc.append(j)
            j = nodes[j]["parent"]
        kvs = [(tk, tv)] + [draft.kv(hats[a], torch.tensor([n + nodes[a]["depth"]])) for a in reversed(anc)]
        k, v = torch.cat([kv[0] for kv in kvs], 2), torch.cat([kv[1] for kv in kvs], 2)
        emb = target.tok_embeddings(torch.tensor([[nodes[i]["token"]]]))
        hats[i] = draft.attend(emb, torch.tensor([n + nodes[i]["depth"]]), k, v,
                               torch.ones(1, 1, 1, k.shape[2], dtype=torch.bool))  # (1, 1, dim)
        top = F.log_softmax(target.output(hats[i][0, 0]).float(), -1).topk(min(top_k, target.args.vocab_size))
        for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
            nodes.append(dict(token=tok, score=nodes[i]["score"] + lp, parent=i, depth=nodes[i]["depth"] + 1))
        return list(range(len(nodes) - top.values.shape[0], len(nodes)))

    by_score = lambda c: (-nodes[c]["score"], c)  # ties: earlier created first
    frontier = expand(0)
    for _ in range(depth - 1):
        frontier = sorted([c for i in frontier for c in expand(i)], key=by_score)[:top_k]
    kept = [0] + sorted(sorted(range(1, len(nodes)), key=by_score)[:keep])
    where = {c: i for i, c in enumerate(kept)}
    return ([nodes[c]["token"] for c in kept], [0] + [where[nodes[c]["parent"]] for c in kept[1:]],
            [nodes[c]["depth"] for c in kept])


@pytest.mark.parametrize("depth,top_k,keep", [(1, 4, 4), (3, 2, 6), (4, 3, 12), (5, 4, 20)])
def test_decode_draft_tree_equals_reference(decode_tiny, depth, top_k, keep, decode_one_thread):
    target, prompts, _, draft = decode_tiny
    with torch.no_grad():
        x = torch.tensor([prompts[2] + [3, 4, 5]])
        _, h = target(x)
        n = x.shape[1] - 1
        dcache = DraftCache(draft, n + 100)
        dcache.write(0, *draft.kv(h[:, :n], torch.arange(n)))
        dcache.write(n, torch.randn_like(dcache.k[:, :, :50]), torch.randn_like(dcache.v[:, :, :50]))  # stale junk
        tokens, parent, dep, anc = decode.draft_tree(target, draft, dcache, n, x[0, n], depth, top_k, keep)
        want = decode_ref_tree(target, draft, h, n, x[0, n].item(), depth, top_k, keep)
    assert (tokens.tolist(), parent.tolist(), dep.tolist()) == want
    # the ancestor mask from its definition: follow parent pointers
    T = len(want[0])
    ref = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        j = i
        while True:
            ref[i, j] = True
            if j == 0:
                break
            j = want[1][j]
    assert torch.equal(anc, ref)


def test_decode_tree_selection_keeps_parents_on_ties(decode_one_thread):
    # a draft whose distributions are exactly uniform: every node at a depth ties, children tie with nothing
    # but a kept node's parent must still be kept, and the choice is deterministic (creation order)
    target = decode_tiny_target(vocab=8)
    draft = decode_random_draft(target)
    with torch.no_grad():
        target.output.weight.zero_()  # uniform draft (and target) distributions
        dcache = DraftCache(draft, 64)
        dcache.write(0, *draft.kv(torch.randn(1, 4, 64), torch.arange(4)))
        for keep in (1, 5, 9, 20):
            tokens, parent, dep, anc = decode.draft_tree(target, draft, dcache, 4, torch.tensor(2), 3, 3, keep)
            assert all(p < i for i, p in enumerate(parent.tolist()) if i)  # parents kept and listed first
            assert dep.tolist() == sorted(dep.tolist())  # uniform: shallower nodes always score higher
            again = decode.draft_tree(target, draft, dcache, 4, torch.tensor(2), 3, 3, keep)
            assert torch.equal(tokens, again[0]) and torch.equal(parent, again[1])


def test_decode_verification_logits_and_kv_compaction(decode_tiny, monkeypatch, decode_one_thread):
    """Each tree node's verification logits equal a plain forward over prefix + its path; after each iteration
    the target cache and the draft cache hold exactly what a fresh prefill of the committed tokens gives."""
    target, prompts, _, draft = decode_tiny
    calls = []
    forward = target.forward

    def spy(tokens, positions=None, cache=None, mask=None, slots=None):
        out = forward(tokens, positions, cache, mask, slots)
        calls.append((tokens.clone(), positions.clone(), mask.clone(), out[0].clone()))
        return out
    monkeypatch.setattr(target, "forward", spy)
    cfg = decode_cfg(depth=4, top_k=3, tree_tokens=12)
    seq = list(prompts[1])
    n = len(seq)
    with torch.no_grad():
        cache, dcache = KVCache(target.args, 1, 200), DraftCache(draft, 200)
        logits, h = target(torch.tensor([seq]), torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
        dcache.write(0, *draft.kv(h, torch.arange(n)))
        root = logits[0, -1].argmax()
        moved = 0
        for _ in range(8):
            new = decode.speculate(target, draft, cache, dcache, n, root, cfg)
            tokens, positions, mask, vlogits = calls[-1]
            parents = {}
            for i in range(1, tokens.shape[1]):  # parent = the deepest other visible tree node
                vis = [j for j in range(i) if mask[i, n + j]]
                parents[i] = vis[-1]
                path, j = [], i
                while j:
                    path.append(tokens[0, j].item())
                    j = parents[j]
                path = seq + [root.item()] + path[::-1]
                assert positions[i].item() == len(path) - 1
                ref, _ = forward(torch.tensor([path]))
                torch.testing.assert_close(vlogits[0, i], ref[0, -1], atol=1e-4, rtol=1e-4)
            # greedy: accepted = the path the target's argmax follows; check and commit it
            seq = seq + [root.item()] + new[:-1]
            moved += any(t != tokens[0, i + 1].item() for i, t in enumerate(new[:-1]))
            n = len(seq)
            full_logits, full_h = forward(torch.tensor([seq]))
            assert new[-1] == full_logits[0, -1].argmax().item()
            fresh = KVCache(target.args, 1, 200)
            forward(torch.tensor([seq]), torch.arange(n), fresh, torch.ones(n, n, dtype=torch.bool).tril())
            torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], atol=1e-5, rtol=1e-5)
            k, v = draft.kv(full_h, torch.arange(n))
            torch.testing.assert_close(dcache.k[:, :, :n], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dcache.v[:, :, :n], v, atol=1e-5, rtol=1e-5)
            root = torch.tensor(new[-1])
    assert moved  # some accepted path was not already in place


# -----------------------------------------------------------------------------
# sampling

def test_decode_probs_from_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = decode.probs_from_logits(logits, DecodeConfig(temperature=0.5))
    torch.testing.assert_close(p, (logits / 0.5).softmax(-1))
    p = decode.probs_from_logits(logits, DecodeConfig(temperature=1.0, top_k_sample=2))
    torch.testing.assert_close(p[0], torch.cat([logits[0, :2].softmax(-1), torch.zeros(3)]))
    full = logits.softmax(-1)[0]  # [0.644, 0.237, 0.087, 0.032, ...]
    p = decode.probs_from_logits(logits, DecodeConfig(temperature=1.0, top_p=0.85))  # 0.644 < 0.85 <= 0.881
    torch.testing.assert_close(p[0], torch.cat([full[:2] / full[:2].sum(), torch.zeros(3)]))
    p = decode.probs_from_logits(logits, DecodeConfig(temperature=1.0, top_p=0.5))  # the top token alone
    torch.testing.assert_close(p[0], torch.tensor([1.0, 0, 0, 0, 0]))
    assert decode.pick(logits[0], DecodeConfig(temperature=0.0), None).item() == 0  # argmax, no division


def decode_exact_joint(target, prompt, cfg, n_tokens):
    """The target's exact distribution over its first n_tokens generated tokens, by enumeration (V^n)."""
    V = target.args.vocab_size
    joint = torch.ones(1)
    with torch.no_grad():
        for step in range(n_tokens):
            ctx = torch.cartesian_prod(*[torch.arange(V)] * step).view(-1, step) if step else torch.zeros(1, 0).long()
            x = torch.cat([torch.tensor(prompt).expand(ctx.shape[0], -1), ctx], 1)
            p = decode.probs_from_logits(target(x)[0][:, -1], cfg).double()  # (V^step, V)
            joint = (joint[:, None] * p).flatten()
    return joint.view(*[V] * n_tokens)


def decode_tv(a, b):
    return 0.5 * (a - b).abs().sum().item()


@pytest.mark.parametrize("mode,depth,top_k,tree_tokens,temperature,top_p,top_k_sample,runs,bound", [
    ("tree", 2, 3, 5, 1.0, 1.0, 0, 2000, 0.07), ("chain", 2, 0, 0, 0.8, 0.9, 6, 1000, 0.09)])
def test_decode_sampling_follows_target(mode, depth, top_k, tree_tokens, temperature, top_p, top_k_sample, runs,
                                        bound, decode_one_thread):
    V = 8
    target = decode_tiny_target(vocab=V, seed=3, sharp=2.0)
    draft = decode_random_draft(target, seed=4)
    with torch.no_grad():  # make the draft's proposals far from the target's distribution
        draft.wo.weight.mul_(200)
        draft.feed_forward.w2.weight.mul_(200)
    prompt = [1, 2, 3]
    cfg = DecodeConfig(mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens, max_new_tokens=3,
                       temperature=temperature, top_p=top_p, top_k_sample=top_k_sample)
    exact = decode_exact_joint(target, prompt, cfg, 3)  # (V, V, V)
    gen = torch.Generator().manual_seed(0)
    counts, accepted = torch.zeros(V, V, V, dtype=torch.float64), []
    for _ in range(runs):
        r = generate_spec(target, draft, prompt, cfg, set(), gen)
        counts[tuple(r.tokens)] += 1
        accepted += r.accepted_lengths
    emp = counts / runs
    # what the output would follow if draft tokens were taken as they come: p(t1) q(t2 | t1)
    with torch.no_grad():
        n = len(prompt)
        _, h = target(torch.tensor([prompt]))
        k, v = draft.kv(h, torch.arange(n))
        hat = draft.attend(target.tok_embeddings(torch.arange(V)[:, None]), torch.tensor([n]), k.expand(V, -1, -1, -1),
                           v.expand(V, -1, -1, -1), torch.ones(1, 1, 1, n, dtype=torch.bool))
        q = target.output(hat[:, 0]).softmax(-1).double()  # (V, V): draft's q(t2 | t1)
    draft_joint = exact.sum((1, 2))[:, None] * q
    assert decode_tv(draft_joint, exact.sum(2)) > 0.3  # the draft is clearly not the target
    # an exact sampler lands at TV ~0.05 here (seeds 0, 1: 0.040-0.059); one that forgets to remove rejected
    # candidates from the residual lands at ~0.13-0.25
    assert decode_tv(emp.sum(2), exact.sum(2)) < bound  # (t1, t2), 64 cells
    assert decode_tv(emp.sum(0), exact.sum(0)) < bound  # (t2, t3): the depth-2 acceptances and the bonus tokens
    assert decode_tv(emp.sum(2), draft_joint) > 0.2
    assert sum(m > 0 for m in accepted) > 0.2 * len(accepted) and 2 in accepted  # acceptance is exercised


def test_decode_accept_sampled_is_exact_per_node(decode_one_thread):
    # the sequential rule alone, 4000 draws: children fixed, output token distributed as p (a rule that accepts
    # c_j with p(c_j) instead of p(c_j) / residual mass lands at TV ~0.18)
    p = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.2, 0.2, 0.2, 0.2, 0.2]])
    tokens, parent = torch.tensor([0, 3, 0, 1]), torch.tensor([0, 0, 0, 0])  # root's children: 3, 0, 1
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        path, new = decode.accept_sampled(p[[0, 1, 1, 1]], tokens, parent, gen)
        counts[new[0]] += 1
        assert len(new) == len(path)  # accepted child (+ bonus) or the residual sample alone
    assert decode_tv(counts / 4000, p[0]) < 0.03


# -----------------------------------------------------------------------------
# the real default target (slow: SmolLM2-135M-Instruct on the CPU)

@pytest.fixture(scope="module")
def decode_real():
    return llama.load_target()


DECODE_REAL_PROMPTS = ["Say hello in one short sentence.", "Explain what a cache is in two sentences."]


def test_decode_real_greedy_spec_equals_plain(decode_real, decode_one_thread):
    target, tok = decode_real
    stop = set(tok.stop_ids)
    ids = [tok.chat([{"role": "user", "content": p}]) for p in DECODE_REAL_PROMPTS]
    plain = [generate_ar(target, x, DecodeConfig(max_new_tokens=40), stop).tokens for x in ids]
    assert plain[0][-1] in stop and len(plain[0]) < 40 and len(plain[1]) == 40  # a stop, and the length limit
    trained = decode_train_draft(target, [torch.tensor(x + p) for x, p in zip(ids, plain)])
    # the random draft (rejections only, its tau is ~1: slow) on the short answer alone
    runs = (("random", "tree", 4, 4, 12, 1), ("trained", "chain", 4, 0, 0, 2), ("trained", "tree", 5, 4, 16, 2))
    for name, mode, depth, top_k, tree_tokens, n_prompts in runs:
        draft = trained if name == "trained" else decode_random_draft(target)
        cfg = DecodeConfig(mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens, max_new_tokens=40)
        for x, want in zip(ids[:n_prompts], plain):
            r = generate_spec(target, draft, x, cfg, stop)
            assert r.tokens == want, (name, mode, depth, top_k, tree_tokens)
            if name == "trained":  # fitted on these answers: acceptances, deep ones too, happen
                assert r.tau > 1.5 and max(r.accepted_lengths) >= 3, r.accepted_lengths


def test_decode_real_plain_equals_transformers_generate(decode_real, decode_one_thread):
    transformers = pytest.importorskip("transformers")
    target, tok = decode_real
    hf = transformers.LlamaForCausalLM.from_pretrained(llama.default_target_dir(), torch_dtype=torch.float32).eval()
    for p in DECODE_REAL_PROMPTS:
        ids = tok.chat([{"role": "user", "content": p}])
        ours = generate_ar(target, ids, DecodeConfig(max_new_tokens=24), set(tok.stop_ids)).tokens
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                              eos_token_id=sorted(tok.stop_ids), pad_token_id=tok.pad_id)
        assert ours == out[0, len(ids):].tolist()


def test_decode_real_cli(decode_real, tmp_path, monkeypatch, capsys, decode_one_thread):
    target, tok = decode_real
    monkeypatch.setattr(llama, "load_target", lambda path, device, dtype, template=None: (target, tok))
    draft_path = tmp_path / "draft.safetensors"
    save_draft(str(draft_path), decode_random_draft(target), target)
    decode.main(llama.cli(DecodeConfig, ["--prompt", "Say hi.", "--mode", "ar", "--max-new-tokens", "8"]))
    out = capsys.readouterr().out
    assert ">>> Say hi." in out and "[ar] " in out and "tokens/s" in out
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Name a fruit.", "And a vegetable?"]}) + "\n"
                       + json.dumps({"prompt": "Say hi."}) + "\n")
    decode.main(llama.cli(DecodeConfig, ["--prompt-file", str(prompts), "--draft", str(draft_path), "--mode", "tree",
                                         "--depth", "2", "--top-k", "2", "--tree-tokens", "3", "--max-new-tokens", "8",
                                         "--json", "--compare"]))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 1] and all(r["identical"] for r in rows)
    for r in rows:
        assert r["mode"] == "tree" and r["new_tokens"] == len(r["tokens"]) <= 8
        assert r["target_forwards"] == 1 + len(r["accepted_lengths"]) and r["tau"] >= 1
        assert r["text"] == tok.decode([t for t in r["tokens"] if t not in tok.stop_ids])
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"category": "writing", "turns": ["Name a fruit.", "And a vegetable?"]}) + "\n"
                     + json.dumps({"category": "math", "turns": ["What is 2+2?"]}) + "\n")
    decode.main(llama.cli(DecodeConfig, ["--bench", str(bench), "--draft", str(draft_path), "--mode", "chain",
                                         "--depth", "2", "--max-new-tokens", "6", "--bench-out", str(tmp_path / "b")]))
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert list(result["results"]) == ["writing", "math", "overall"]
    overall = result["results"]["overall"]
    assert overall["turns"] == 3 and overall["identical"] == 1.0 and len(overall["acceptance_by_depth"]) == 2
    assert overall["tokens_per_s"] > 0 and overall["plain_tokens_per_s"] > 0 and overall["tau"] >= 1
    assert result["settings"]["temperature"] == 0 and result["settings"]["hardware"]
    assert (tmp_path / "b" / "bench.md").read_text().strip() == out.strip() and "| overall | 3 |" in out
    too_many = str(target.args.max_seq_len - 20)  # the chat template alone is longer than 20 tokens
    with pytest.raises(BeagleError, match="longer than the context"):
        decode.main(llama.cli(DecodeConfig, ["--prompt", "hi", "--mode", "ar", "--max-new-tokens", too_many]))


def test_decode_mtbench_questions():
    convs = decode.read_jsonl_or_lines(decode.mtbench_path())
    assert len(convs) == 80 and all(len(turns) == 2 for turns, _ in convs)
    assert len({category for _, category in convs}) == 8


def test_decode_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond {not json}\n")
    assert decode.read_prompts(DecodeConfig(prompt_file=str(tmp_path / "p.txt"))) == [
        (["first prompt"], "prompt"), (["second {not json}"], "prompt")]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(BeagleError, match="bad.jsonl:2"):
        decode.read_prompts(DecodeConfig(prompt_file=str(tmp_path / "bad.jsonl")))
    with pytest.raises(BeagleError, match="cannot read"):
        decode.read_prompts(DecodeConfig(prompt_file=str(tmp_path / "missing.jsonl")))


def test_decode_streamer_holds_back_partial_characters(capsys):
    class Bytes:  # one token per UTF-8 byte; 300 = a stop token
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")
    text = "héllo wörld\nsecond line 😀 ok\n"
    ids = list(text.encode()) + [300]
    stream = decode.Streamer(Bytes(), {300})
    for i in range(1, len(ids) + 1):
        stream(ids[:i])
    out = capsys.readouterr().out
    assert out == text and "\ufffd" not in out


def test_decode_real_prompt_ids(decode_real):
    _, tok = decode_real
    cfg = DecodeConfig(system="You are terse.")
    ids = decode.prompt_ids(tok, cfg, ["Hi", "Again"], ["Hello!"])
    assert ids == tok.chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}])
    assert decode.prompt_ids(tok, DecodeConfig(template="raw"), ["Hi"], []) == tok.encode("Hi")


def test_decode_real_cli_subprocess_error_is_one_line(decode_real):
    too_many = str(decode_real[0].args.max_seq_len - 20)
    r = subprocess.run([sys.executable, str(DECODE_HERE / "decode.py"), "--prompt", "hi", "--mode", "ar",
                        "--max-new-tokens", too_many], capture_output=True, text=True, cwd=DECODE_HERE, timeout=300)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().startswith("error: prompt of") and len(r.stderr.strip().splitlines()) == 1
