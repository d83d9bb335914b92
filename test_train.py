"""Tests for beagle.py and train.py (CPU, tiny random targets): python -m pytest -q test_train.py"""
import json
import math
import os

import pytest
import torch

import beagle
import train
from beagle import Beagle, DraftArgs, block_mask, load_draft, save_draft, simulation_mask, window_positions
from llama import BeagleError, ModelArgs, Transformer


# -----------------------------------------------------------------------------
# helpers (prefixed train_ so they stay unique when the test files are merged)

def train_tiny_target(seed=0, vocab=262, dim=32):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=64,
                                 max_seq_len=512)).eval()


class TrainCharTokenizer:
    """Stand-in for llama's Tokenizer: ChatML specials 0..2, one id per latin-1 character after them."""
    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab_size, eos_id, bos_id, pad_id, stop_ids = 262, 0, 1, 0, {0, 2}

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            for j, s in enumerate(self.SPECIAL):
                if text.startswith(s, i):
                    ids.append(j)
                    i += len(s)
                    break
            else:
                ids.append(3 + min(ord(text[i]), 255))
                i += 1
        return ids

    def decode(self, ids):
        return "".join(self.SPECIAL[i] if i < 3 else chr(i - 3) for i in ids)

    def render(self, messages, add_generation_prompt=True):
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render(messages, add_generation_prompt))


def train_write_data(path, n=12):
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7 + 2, i % 5 + 3
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"what is {a} times {b}?"},
                                                  {"from": "gpt", "value": f"{a} times {b} is {a * b}."}]}) + "\n")
    return str(path)


def train_windows(T, k, eps):
    """The windows of PAPER.md, listed literally: a partial window [0, eps), then [eps, eps+k), ..."""
    starts = ([0] if eps > 0 else []) + list(range(eps, T, k))
    ends = starts[1:] + [T]
    return [list(range(a, b)) for a, b in zip(starts, ends)]


def train_ref_block(T, k, eps):
    m = torch.zeros(T, T, dtype=torch.bool)
    for w in train_windows(T, k, eps):
        n = w[0] - 1  # the window's first query is n + 1; every query in it sees keys j <= n
        for i in w:
            for j in range(T):
                m[i, j] = j <= n
    return m


def train_ref_simulation(T, k, eps, step):
    m = torch.zeros(T, 2 * T, dtype=torch.bool)
    m[:, :T] = train_ref_block(T, k, eps)
    for w in train_windows(T, k, eps):
        for p, i in enumerate(w, 1):  # p: 1-based window position of query i
            if p >= step:
                for q in range(1, step):  # draft states at window positions 1..step-1 of its own window
                    if q <= len(w):
                        m[i, T + w[q - 1]] = True
    return m


# -----------------------------------------------------------------------------
# masks

def test_train_paper_example_k3_eps1():
    x = """
    .......
    x......
    x......
    x......
    xxxx...
    xxxx...
    xxxx...
    """
    want = torch.tensor([[c == "x" for c in row.strip()] for row in x.strip().splitlines()])
    assert torch.equal(block_mask(7, 3, 1), want)
    assert window_positions(7, 3, 1).tolist() == [1, 1, 2, 3, 1, 2, 3]


def test_train_masks_equal_references():
    for T in (1, 2, 5, 7, 13, 20):
        for k in (1, 2, 3, 5):
            for eps in range(k):
                assert torch.equal(block_mask(T, k, eps), train_ref_block(T, k, eps)), (T, k, eps)
                for step in range(1, k + 1):
                    assert torch.equal(simulation_mask(T, k, eps, step), train_ref_simulation(T, k, eps, step)), \
                        (T, k, eps, step)


def test_train_simulation_step1_is_block_mask_and_offset_checked():
    assert torch.equal(simulation_mask(11, 4, 2, 1), torch.cat([block_mask(11, 4, 2),
                                                                torch.zeros(11, 11, dtype=torch.bool)], 1))
    with pytest.raises(AssertionError):
        block_mask(8, 3, 3)


# -----------------------------------------------------------------------------
# the draft

def test_train_no_visible_key_rows_are_finite_and_zero_attention():
    target = train_tiny_target()
    draft = Beagle(DraftArgs.from_target(target.args))
    tok = torch.randint(0, 262, (2, 9))
    _, h = target(tok)
    emb = target.tok_embeddings(tok).detach().requires_grad_()
    pos = torch.arange(9)
    mask = block_mask(9, 3, 2)[None, None]  # rows 0, 1 (partial window) see nothing
    hat = draft(emb, pos, h, pos, mask)
    hat.square().sum().backward()
    assert torch.isfinite(hat).all() and torch.isfinite(emb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters())
    y = emb[:, :2]  # no key: attention contributes exactly 0, hat_h = FFN(norm(e)) + e
    assert torch.allclose(hat[:, :2], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-6)
    # rows with keys are untouched by the dummy key: same result as attending alone
    hat4 = draft(emb[:, 4:5], pos[4:5], h, pos, mask[:, :, 4:5])
    assert torch.allclose(hat4, hat[:, 4:5], atol=1e-6)
    # row 6 (keys 0..4) equals attention written out by hand: GQA head g reads kv head g // 2, RoPE by position
    from llama import apply_rope, rope
    with torch.no_grad():
        x, kx = emb[:, 6:7], draft.kv_norm(h[:, :5])
        q = draft.wq(draft.query_norm(x)).view(2, 1, 4, 8).transpose(1, 2)  # (B, H, 1, D)
        q = apply_rope(q, *rope(draft.inv_freq, torch.tensor([6]), q.dtype))
        k = apply_rope(draft.wk(kx).view(2, 5, 2, 8).transpose(1, 2), *rope(draft.inv_freq, torch.arange(5), q.dtype))
        v = draft.wv(kx).view(2, 5, 2, 8).transpose(1, 2)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, H, 5, D)
        att = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1) @ v  # (B, H, 1, D)
        y = draft.wo(att.transpose(1, 2).reshape(2, 1, 32)) + x
        assert torch.allclose(hat[:, 6:7], draft.feed_forward(draft.ffn_norm(y)) + y, atol=1e-5)


def test_train_simulation_equals_autoregressive_drafting():
    """Stage 2's step m at window position m == drafting m steps by appending the draft's own states."""
    target = train_tiny_target()
    draft = Beagle(DraftArgs.from_target(target.args))
    T, k, eps = 14, 4, 2
    tok = torch.randint(0, 262, (2, T))
    with torch.no_grad():
        _, h = target(tok)
        emb = target.tok_embeddings(tok)
        outs = train.DraftStep(draft)(emb, h, k, eps, k)
        for w in train_windows(T, k, eps)[1:]:  # full windows after the partial one
            n = w[0] - 1
            states, kpos = h[:, :n + 1], list(range(n + 1))
            for m, i in enumerate(w, 1):  # draft step m: query e(t_i) over true states <= n + own states
                kp = torch.tensor(kpos)
                hat = draft(emb[:, i:i + 1], torch.tensor([i]), states, kp,
                            torch.ones(1, 1, 1, len(kpos), dtype=torch.bool))
                idx, sim = outs[m - 1]
                assert torch.allclose(sim[:, idx.tolist().index(i)], hat[:, 0], atol=1e-5), (w, m)
                states, kpos = torch.cat([states, hat], 1), kpos + [i]


# -----------------------------------------------------------------------------
# checkpoint

def test_train_checkpoint_roundtrip_and_errors(tmp_path):
    target = train_tiny_target()
    draft = Beagle(DraftArgs.from_target(target.args))
    path = str(tmp_path / "d.safetensors")
    save_draft(path, draft, target, extra={"stage": 1})
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    back = load_draft(path, target)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), back.state_dict().values()))
    # same target in bf16 / fp16: same fingerprint; another target: a one-line BeagleError
    bf = load_draft(path, train_tiny_target().to(torch.bfloat16), dtype=torch.bfloat16)
    assert bf.wq.weight.dtype == torch.bfloat16 and bf.inv_freq.dtype == torch.float32
    load_draft(path, train_tiny_target().half())
    with pytest.raises(BeagleError, match="another target: same shape"):
        load_draft(path, train_tiny_target(seed=1))
    with pytest.raises(BeagleError, match="another target: dim"):
        load_draft(path, train_tiny_target(dim=48))
    with pytest.raises(BeagleError, match="no draft checkpoint"):
        load_draft(str(tmp_path / "missing.safetensors"), target)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(BeagleError, match="corrupt"):
        load_draft(str(bad), target)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BeagleError, match="not a Beagle draft"):
        load_draft(str(tmp_path / "other.safetensors"), target)


def test_train_fingerprint_dtype_robust():
    t = train_tiny_target()
    a = beagle.target_fingerprint(t)
    for dtype in (torch.bfloat16, torch.float16):
        b = beagle.target_fingerprint(train_tiny_target().to(dtype))
        assert torch.allclose(torch.tensor(a["embedding_norms"]), torch.tensor(b["embedding_norms"]), rtol=2e-3)
        beagle.check_fingerprint(a, train_tiny_target().to(dtype))
    other = beagle.target_fingerprint(train_tiny_target(seed=3))
    assert not torch.allclose(torch.tensor(a["embedding_norms"]), torch.tensor(other["embedding_norms"]), rtol=5e-3)


# -----------------------------------------------------------------------------
# training

def train_fixed_batch(target, T=24, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 262, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 18:] = False  # right padding
    return ids, torch.ones(B, T, dtype=torch.bool), valid


def train_overfit(draft, target, stage, steps_sim, n_steps=60, k=3):
    ids, loss_mask, valid = train_fixed_batch(target)
    with torch.no_grad():
        logits, h = target(ids)
        emb = target.tok_embeddings(ids)
    model = train.DraftStep(draft)
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for s in range(n_steps):
        offset = s % k
        labels = train.label_positions(loss_mask, valid, k, offset)
        outs = model(emb, h + 0.01 * torch.randn_like(h), k, offset, steps_sim)
        loss, ce, vl = train.draft_loss(target.output, outs, logits, h, labels, k, stage, 10.0)
        assert math.isfinite(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_train_stage1_and_stage2_overfit_one_batch():
    # a random tiny target is nearly uniform, so the soft cross-entropy would sit at its entropy floor (~log V);
    # a sharpened LM head gives near one-hot targets whose loss can go to ~0
    target = train_tiny_target()
    with torch.no_grad():
        target.output.weight.mul_(50)
    for stage, steps_sim in ((1, 0), (2, 3)):
        torch.manual_seed(0)
        draft = Beagle(DraftArgs.from_target(target.args))
        losses = train_overfit(draft, target, stage, steps_sim, n_steps=80)
        assert sum(losses[-5:]) < 0.4 * sum(losses[:5]), (stage, losses)
    l2 = train_overfit(draft, target, 2, 3, n_steps=40)  # stage 2 continued further: still going down
    assert sum(l2[-5:]) < 0.9 * sum(l2[:5]), l2


def test_train_labels_shift_padding_and_unseen():
    loss_mask = torch.tensor([[False, False, True, True, True, False]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    lab = train.label_positions(loss_mask, valid, 3, 1)  # position 0 sees no key
    # position i is trained when token i+1 is a label: i = 1, 2, 3; i = 4 predicts padding
    assert lab.tolist() == [[False, True, True, True, False, False]]


def train_cfg(tmp_path, out, **kw):
    base = dict(data=train_write_data(tmp_path / "chat.jsonl"), out=str(tmp_path / out), window=3, sim_steps=2,
                epochs=5, batch_size=4, lr=3e-3, warmup=2, eval_interval=3, eval_frac=0.2, log_interval=2,
                max_len=64, device="cpu", progress=False)
    base.update(kw)
    return train.TrainConfig(**base)


def test_train_loop_resume_stage2_init(tmp_path):
    target, tok = train_tiny_target(), TrainCharTokenizer()
    full = train.train(train_cfg(tmp_path, "full", max_steps=7), target, tok)
    train.train(train_cfg(tmp_path, "part", max_steps=4), target, tok)  # "interrupted" mid-epoch 1
    resumed = train.train(train_cfg(tmp_path, "part", max_steps=7, resume=True), target, tok)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(BeagleError, match="different --window"):
        train.train(train_cfg(tmp_path, "part", window=4, max_steps=9, resume=True), target, tok)
    out = tmp_path / "full"
    for f in ("draft.safetensors", "state.pt", "train.csv", "eval.csv", "curves.png"):
        assert (out / f).stat().st_size > 0, f
    rows = (out / "eval.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,acc1,acc2,acc3" and len(rows) == 1 + 3  # steps 3, 6, 7
    assert all(0.0 <= float(x) <= 1.0 for x in rows[-1].split(",")[2:])
    # stage 2 starts from the stage-1 draft: with lr 0 its weights are the checkpoint's, and it trains
    ckpt = str(out / "draft.safetensors")
    s2 = train.train(train_cfg(tmp_path, "s2", stage=2, init=ckpt, lr=0.0, max_steps=1), target, tok)
    assert all(torch.equal(a, b) for a, b in zip(s2.state_dict().values(), full.state_dict().values()))
    s2 = train.train(train_cfg(tmp_path, "s2b", stage=2, init=ckpt, max_steps=3), target, tok)
    assert not torch.equal(s2.wq.weight, full.wq.weight)
    with pytest.raises(BeagleError, match="another target"):
        train.train(train_cfg(tmp_path, "s2c", stage=2, init=ckpt, max_steps=1), train_tiny_target(seed=5), tok)


# -----------------------------------------------------------------------------
# the CLI, end to end, on a tiny HF-format target that uses the real SmolLM2 tokenizer

def train_tiny_hf_dir(path):
    """A 2-layer random Llama in HF layout beside the default model's tokenizer files (converted once from the
    pip-installed GGUF by llama.load_target if the cache does not hold it yet)."""
    import shutil
    import llama
    from safetensors.torch import save_file
    src = llama.default_target_dir()
    if not (src / "tokenizer.json").exists():
        llama.load_target()  # converts the default GGUF into the cache (slow once, then cached)
    os.makedirs(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, path / f)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
           "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
           "tie_word_embeddings": False}
    (path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=64))
    sd = model.state_dict()
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}  # our names -> the HF layout
    layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}

    def hf_name(name):
        if name in top:
            return top[name]
        _, i, rest = name.split(".", 2)  # layers.{i}.<module>.weight
        return f"model.layers.{i}.{layer[rest.removesuffix('.weight')]}.weight"

    save_file({hf_name(k): v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return str(path)


def test_train_cli_end_to_end(tmp_path):
    import subprocess
    import sys
    target = train_tiny_hf_dir(tmp_path / "tiny")
    data_path = train_write_data(tmp_path / "chat.jsonl", n=10)
    here = os.path.dirname(os.path.abspath(__file__))

    def run(*args, launcher=()):
        return subprocess.run([sys.executable, *launcher, os.path.join(here, "train.py"), "--target", target,
                               "--data", data_path, "--device", "cpu", "--batch-size", "2", "--window", "3",
                               "--sim-steps", "2", "--eval-frac", "0.2", "--max-len", "128", "--eval-interval", "2",
                               "--progress", "false", *args], capture_output=True, text=True, cwd=tmp_path)

    # stage 1 under torchrun: 2 CPU processes (gloo DDP), 8 examples / (batch 2 x 2 ranks) = 2 steps per epoch
    r = run("--stage", "1", "--out", "s1", "--max-steps", "3", "--log-interval", "1",
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert r.returncode == 0, r.stderr
    assert "2 steps/epoch" in r.stdout and r.stdout.count("step      3 | epoch  1 | loss") == 1  # rank 0 logs
    assert "top-1 agreement at draft steps 1..3" in r.stdout
    for f in ("draft.safetensors", "state.pt", "train.csv", "eval.csv", "curves.png"):
        assert (tmp_path / "s1" / f).stat().st_size > 0, f
    r = run("--stage", "2", "--out", "s2", "--init", "s1/draft.safetensors", "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    draft = load_draft(str(tmp_path / "s2" / "draft.safetensors"), __import__("llama").load_target(target)[0])
    assert draft.args.dim == 32
    # user errors are BeagleErrors (printed by __main__ as one "error: ..." line)
    with pytest.raises(BeagleError, match="no draft checkpoint at nowhere.safetensors"):
        train.main(train.TrainConfig(target=target, data=data_path, out=str(tmp_path / "s3"), stage=2,
                                     init="nowhere.safetensors", device="cpu", progress=False))
    with pytest.raises(BeagleError, match="--sim-steps"):
        train.main(train.TrainConfig(stage=2, sim_steps=4, window=3))
