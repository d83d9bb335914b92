"""
Tests of decode.py's static-shape steps (--cuda-graph): on the CPU they run eagerly and must give exactly the
tokens of the default (dynamic-shape) path; their shapes must not depend on the prefix length; they must not read
anything back to the host; the masks built on the device must equal the dynamic ones on the live slots.

    python -m pytest -q test_graph.py          # ~30 s on one CPU thread (the real-model test is the slow one)
"""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import decode
import llama
from beagle import Beagle, DraftArgs, save_draft
from decode import DecodeConfig, DraftCache, Graphed, generate_ar, generate_spec
from llama import KVCache, ModelArgs, Transformer


@pytest.fixture(autouse=True, scope="module")
def graph_one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def graph_tiny_target(vocab=48, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=128, max_seq_len=256)
    target = Transformer(args).eval()
    with torch.no_grad():
        target.output.weight.mul_(3.0)  # peaked distributions, like a real model's
    return target


def graph_draft(target, seqs=(), steps=0, seed=1):
    """A random draft, or one fitted briefly (regression on the target's states, query i over keys < i) so that
    drafts get accepted and the accept / move / draft-cache paths run."""
    torch.manual_seed(seed)
    draft = Beagle(DraftArgs.from_target(target.args))
    opt = torch.optim.Adam(draft.parameters(), lr=1e-3)
    with torch.no_grad():
        data = [(target.tok_embeddings(x[None]), target(x[None])[1]) for x in seqs]
    for step in range(steps):
        emb, h = data[step % len(data)]
        pos = torch.arange(h.shape[1])
        hat = draft(emb, pos, h, pos, (pos[None, :] < pos[:, None])[None, None])
        loss = F.mse_loss(hat[:, 1:], h[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return draft.eval()


@pytest.fixture(scope="module")
def graph_tiny():
    target = graph_tiny_target()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 48, (L,), generator=g).tolist() for L in (1, 5, 12, 30)]
    seqs = [torch.tensor(p + generate_ar(target, p, DecodeConfig(max_new_tokens=48), set()).tokens) for p in prompts]
    return target, prompts, graph_draft(target), graph_draft(target, seqs, steps=60)


GRAPH_SETTINGS = [("chain", 1, 0, 0), ("chain", 4, 0, 0), ("tree", 1, 3, 3), ("tree", 3, 2, 5), ("tree", 4, 3, 10),
                  ("tree", 5, 10, 60)]


def test_graph_static_equals_dynamic_tiny(graph_tiny):
    target, prompts, random_draft, trained_draft = graph_tiny
    accepted = []
    for prompt in prompts:
        for temperature in (0.0, 0.8):
            base = DecodeConfig(max_new_tokens=37, temperature=temperature, top_p=0.9)
            runs = {}
            for graph in (False, True):
                cfg = dataclasses.replace(base, cuda_graph=graph)
                runs[graph] = [generate_ar(target, prompt, cfg, set(), torch.Generator().manual_seed(1)).tokens]
                for mode, depth, top_k, tree_tokens in GRAPH_SETTINGS:
                    c = dataclasses.replace(cfg, mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens)
                    for draft in (random_draft, trained_draft):
                        r = generate_spec(target, draft, prompt, c, set(), torch.Generator().manual_seed(1))
                        runs[graph].append((r.tokens, r.accepted_lengths))
                        accepted += r.accepted_lengths
            assert runs[True] == runs[False], (prompt, temperature)
            if temperature == 0:  # and speculative greedy still equals plain greedy
                assert all(tokens == runs[True][0] for tokens, _ in runs[True][1:])
    assert 0 in accepted and max(accepted) >= 3  # rejections and deep acceptances (KV moves) happened
    # one static bundle per (cache size, draft, tree, greedy or not), reused across answers: all fit in 512 slots
    store = target.decode_static
    assert {key[0] for key in store if key != "pool"} == {512}
    assert len(store) == 1 + 2 * 2 * len(GRAPH_SETTINGS)


def graph_calls(monkeypatch, obj, name):
    """Record the tensor arguments of obj.name (a bound method) call by call."""
    calls, real = [], getattr(obj, name)

    def spy(*args, **kw):
        calls.append([a.clone() if torch.is_tensor(a) else a for a in list(args) + list(kw.values())])
        return real(*args, **kw)
    monkeypatch.setattr(obj, name, spy)
    return calls


def test_graph_step_shapes_do_not_depend_on_n(graph_tiny, monkeypatch):
    """Every tensor a static step hands to the target and the draft has the same shape at every prefix length."""
    target, prompts, _, draft = graph_tiny
    spies = [graph_calls(monkeypatch, target, "forward"), graph_calls(monkeypatch, draft, "attend"),
             graph_calls(monkeypatch, draft, "kv")]
    shapes = lambda calls: {tuple(tuple(a.shape) if torch.is_tensor(a) else a for a in c) for c in calls}
    for mode in ("ar", "tree"):
        cfg = DecodeConfig(mode=mode, depth=3, top_k=2, tree_tokens=5, max_new_tokens=30, cuda_graph=True)
        seen, ns = [], set()
        for prompt in prompts[1:]:
            for calls in spies:
                calls.clear()
            r = (generate_ar(target, prompt, cfg, set()) if mode == "ar" else generate_spec(target, draft, prompt, cfg,
                                                                                          set()))
            fwd, att, kv = spies
            assert len(r.tokens) == 30 and fwd[0][0].shape[1] == len(prompt)  # the first forward is the prefill
            seen.append((shapes(fwd[1:]), shapes(att), shapes(kv[1:])))  # (kv[0]: the prefill's states)
            acc = r.accepted_lengths or [0] * (len(r.tokens) - 1)  # plain: one token per step
            ns |= {len(prompt) + sum(acc[:i]) + i for i in range(len(acc))}  # the prefix length at each step
        assert len(ns) > 20  # many prefix lengths...
        assert seen[0] == seen[1] == seen[2] and len(seen[0][0]) == 1  # ...one set of shapes, one target shape
        if mode == "tree":  # the draft's root step and later steps; its K/V: lazy appends of 1 and k, the commit
            assert len(seen[0][1]) == 2 and len(seen[0][2]) == 3


class GraphHostReads(TorchDispatchMode):
    """Fails on every ATen op that reads a device value back to the host (.item(), bool(t), nonzero, ...)."""
    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "equal", "is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING or (name == "repeat_interleave" and torch.is_tensor(args[0]) and
                                    (kwargs or {}).get("output_size") is None and len(args) < 2):
            pytest.fail(f"aten.{name} reads back to the host inside a step")
        return func(*args, **(kwargs or {}))


def test_graph_steps_never_read_back_to_the_host(graph_tiny, monkeypatch):
    """A CUDA graph cannot contain a device->host read: run the static steps with every such op failing."""
    target, prompts, _, draft = graph_tiny
    real, steps = Graphed.__call__, []

    def guarded(self, *inputs):
        steps.append(1)
        with GraphHostReads(), monkeypatch.context() as m:
            for name in ("tolist", "numpy", "cpu"):  # (these leave ATen without a dispatched op)
                m.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"{name} inside a step"))
            return real(self, *inputs)
    monkeypatch.setattr(Graphed, "__call__", guarded)
    with pytest.raises(pytest.fail.Exception, match="_local_scalar_dense"):  # the guard works
        Graphed(lambda x: x + x.item(), on=False)(torch.ones(1))
    for mode in ("ar", "tree"):
        cfg = DecodeConfig(mode=mode, depth=4, top_k=3, tree_tokens=10, max_new_tokens=20, cuda_graph=True)
        steps.clear()
        r = (generate_ar(target, prompts[2], cfg, set()) if mode == "ar" else
             generate_spec(target, draft, prompts[2], cfg, set()))
        assert len(steps) == (len(r.tokens) - 1 if mode == "ar" else len(r.accepted_lengths)) > 3


def test_graph_masks_equal_dynamic_masks_on_live_slots(graph_tiny, monkeypatch):
    """The static draft and verification masks (full cache width, built from n on the device) equal the dynamic
    ones (as decode.py built them before: ones over the prefix, concatenated with the tree block) on the live
    slots, and are False beyond; the trees and logits are the same."""
    target, prompts, _, draft = graph_tiny
    # tree_mask against its definition, for n as an int and as a device tensor
    anc = torch.rand(6, 6) < 0.5
    for n in (1, 7):
        want = torch.cat([torch.ones(6, n, dtype=torch.bool), anc], 1)
        assert torch.equal(decode.tree_mask(anc, n, n + 6), want)
        full = decode.tree_mask(anc, torch.tensor(n), 40)
        assert full.shape == (6, 40) and torch.equal(full[:, :n + 6], want) and not full[:, n + 6:].any()
    x = torch.tensor([prompts[2] + [3, 4, 5]])
    with torch.no_grad():
        _, h = target(x)
    n, L = x.shape[1] - 1, 64
    att, fwd = graph_calls(monkeypatch, draft, "attend"), graph_calls(monkeypatch, target, "forward")
    out = {}
    for static in (False, True):
        att.clear(), fwd.clear()
        cache, dcache = KVCache(target.args, 1, L), DraftCache(draft, L)
        with torch.no_grad():
            target.forward(x[:, :n], torch.arange(n), cache, torch.ones(n, n, dtype=torch.bool).tril())
            dcache.write(0, *draft.kv(h[:, :n], torch.arange(n)))
            dcache.write(n, torch.randn(1, draft.n_kv_heads, 30, draft.head_dim), torch.randn(1, draft.n_kv_heads,
                                                                                            30, draft.head_dim))
            nn = torch.tensor(n) if static else n
            out[static] = decode.propose(target, draft, cache, dcache, nn, x[0, n], 4, 3, 10)
        out[static, "masks"] = [c[4] for c in att] + [fwd[-1][3]]
    for a, b in zip(out[False][:4], out[True][:4]):  # tokens, parent, depth, anc
        assert torch.equal(a, b)
    torch.testing.assert_close(out[False][4], out[True][4], atol=1e-5, rtol=1e-5)  # verification logits
    dyn, sta = out[False, "masks"], out[True, "masks"]
    assert len(dyn) == len(sta) == 5  # 4 draft steps + the verification
    for d, s in zip(dyn, sta):
        d, s = d.reshape(-1, d.shape[-1]), s.reshape(-1, s.shape[-1])
        assert s.shape[-1] == L and torch.equal(s[:, :d.shape[-1]], d) and not s[:, d.shape[-1]:].any()
    T = out[False][0].shape[0]
    assert torch.equal(dyn[-1], torch.cat([torch.ones(T, n, dtype=torch.bool), out[False][3]], 1))


class GraphFakeCuda:
    """Stand-ins for torch.cuda's stream and graph calls, recording what Graphed does with them. They fake no
    results: replay only counts, so the test checks the bookkeeping (buffers, warm-up, capture), not the math."""

    def __init__(self):
        self.log, self.capturing = [], False
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append("wait")

        class CUDAGraph:
            def replay(self):
                fake.log.append("replay")

        class Capture:
            def __init__(self, graph, pool=None):
                fake.log.append(("capture", pool))

            def __enter__(self):
                fake.capturing = True

            def __exit__(self, *exc):
                fake.capturing = False

        class StreamCtx:
            def __init__(self, s):
                pass

            def __enter__(self):
                fake.log.append("side stream")

            def __exit__(self, *exc):
                pass
        self.Stream, self.CUDAGraph, self.graph, self.stream = Stream, CUDAGraph, Capture, StreamCtx
        self.current_stream = lambda: Stream()


def test_graph_graphed_helper_bookkeeping(monkeypatch):
    calls, fake = [], GraphFakeCuda()

    def fn(a, b):  # records the buffers it was called with; its outputs must be what every call returns
        calls.append((a, b, fake.capturing))
        return a * 2, b + 1

    off = Graphed(fn, on=False)
    x = torch.tensor([1.0, 2.0])
    out = off(x, torch.tensor(3))
    assert calls[0][0] is x and torch.equal(out[0], x * 2) and not calls[0][2]  # off: just the eager function
    calls.clear()
    for name in ("Stream", "CUDAGraph", "graph", "stream", "current_stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    g = Graphed(fn, on=True, pool="POOL")
    x1, y1 = torch.tensor([1.0, 2.0]), torch.tensor(3)
    out1 = g(x1, y1)
    # warm-up twice on the side stream, then one capture, all on static copies of the inputs, then one replay
    assert [c[2] for c in calls] == [False, False, True]
    assert all(c[0] is g.inputs[0] and c[1] is g.inputs[1] for c in calls) and g.inputs[0] is not x1
    assert fake.log == ["wait", "side stream", "wait", ("capture", "POOL"), "replay"]
    assert out1 is g.outputs and torch.equal(out1[0], x1 * 2)  # the capture-time outputs (here: computed eagerly)
    x2, y2 = torch.tensor([5.0, 6.0]), torch.tensor(7)
    buf = g.inputs[0].data_ptr()
    out2 = g(x2, y2)
    assert len(calls) == 3 and fake.log[-1] == "replay" and fake.log.count("replay") == 2  # no new capture
    assert g.inputs[0].data_ptr() == buf and torch.equal(g.inputs[0], x2) and torch.equal(g.inputs[1], y2)
    assert out2 is out1  # the same static outputs, which the (real) replay would have refreshed


class GraphEager(Graphed):
    """The static steps run eagerly, with CUDA's sync debug mode raising on any device->host synchronisation."""

    def __init__(self, fn, on, pool=None):
        super().__init__(fn, False, pool)

    def __call__(self, *inputs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().__call__(*inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run this on the GPU machine)")
def test_graph_cuda_graphs_replay_the_eager_steps(monkeypatch):
    """GPU only: the captured graphs give the tokens of the same static steps run eagerly (same kernels), and of
    the dynamic path (fp32 tiny target); graphs are captured once and replayed across answers."""
    target = graph_tiny_target().cuda()
    draft = graph_draft(target).cuda()
    prompts = [[1, 2, 3], list(range(5, 25))]
    runs = {}
    for name in ("dynamic", "eager static", "graphs"):
        cfg = DecodeConfig(max_new_tokens=40, cuda_graph=name != "dynamic")
        with monkeypatch.context() as m:
            if name == "eager static":  # the same static steps, never captured
                m.setattr(decode, "Graphed", GraphEager)
            runs[name] = []
            for prompt in prompts:
                for temperature in (0.0, 0.8):
                    c = dataclasses.replace(cfg, temperature=temperature)
                    gen = lambda: torch.Generator(device="cuda").manual_seed(3)
                    runs[name].append(generate_ar(target, prompt, c, set(), gen()).tokens)
                    for mode, depth, top_k, tree_tokens in (("chain", 3, 0, 0), ("tree", 4, 3, 10)):
                        s = dataclasses.replace(c, mode=mode, depth=depth, top_k=top_k, tree_tokens=tree_tokens)
                        runs[name].append(generate_spec(target, draft, prompt, s, set(), gen()).tokens)
        store = target.__dict__.pop("decode_static", {})  # fresh caches and graphs for the next variant
        steps = [v[2] for k, v in store.items() if k != "pool"]
        assert len(steps) == (0 if name == "dynamic" else 5)  # plain, (chain, tree) x (greedy, sampled): reused
        assert all((s.graph is not None) == (name == "graphs") for s in steps)
    assert runs["graphs"] == runs["eager static"] == runs["dynamic"]


def test_graph_cli_flag():
    assert llama.cli(DecodeConfig, ["--cuda-graph"]).cuda_graph is True
    assert llama.cli(DecodeConfig, []).cuda_graph is False


# -----------------------------------------------------------------------------
# the real default target (slow: SmolLM2-135M-Instruct on the CPU)

def test_graph_real_static_equals_dynamic(tmp_path, monkeypatch, capsys):
    target, tok = llama.load_target()
    stop = set(tok.stop_ids)
    ids = tok.chat([{"role": "user", "content": "Explain what a cache is in two sentences."}])
    draft = graph_draft(target)
    want = None
    for temperature in (0.0, 0.7):
        runs = {}
        for graph in (False, True):
            cfg = DecodeConfig(max_new_tokens=24, temperature=temperature, cuda_graph=graph)
            runs[graph] = [generate_ar(target, ids, cfg, stop, torch.Generator().manual_seed(2)).tokens]
            if temperature == 0:
                cfg = dataclasses.replace(cfg, mode="tree", depth=2, top_k=2, tree_tokens=3)
                runs[graph].append(generate_spec(target, draft, ids, cfg, stop).tokens)
        assert runs[True] == runs[False] and len(runs[True][0]) == 24
        if temperature == 0:
            want = runs[True][0]
            assert runs[True][1] == want  # speculative greedy == plain greedy on the static path
        else:
            assert runs[True][0] != want  # the sampled answer is not the greedy one (sampling was exercised)
    # the command line with --cuda-graph (on the CPU: the static steps, eagerly)
    monkeypatch.setattr(llama, "load_target", lambda path, device, dtype, template=None: (target, tok))
    save_draft(str(tmp_path / "d.safetensors"), draft, target)
    decode.main(llama.cli(DecodeConfig, ["--prompt", "Say hi.", "--draft", str(tmp_path / "d.safetensors"),
                                         "--depth", "2", "--top-k", "2", "--tree-tokens", "3", "--max-new-tokens", "8",
                                         "--json", "--compare", "--cuda-graph", "--device", "cpu"]))
    row = json.loads(capsys.readouterr().out)
    assert row["identical"] and row["new_tokens"] == 8 and row["mode"] == "tree"
