"""
Two-stage block-attention training of the Beagle draft against a frozen target (README, "Method").

    python train.py --stage 1 --data data/selfgen.jsonl --out runs/s1 --epochs 10 --device cuda
    python train.py --stage 2 --data data/selfgen.jsonl --init runs/s1/draft.safetensors --out runs/s2 --epochs 10
    python train.py --stage 1 ... --max-steps 1000 ; python train.py --stage 1 ... --resume   # continue exactly
    torchrun --standalone --nproc-per-node 8 train.py --stage 1 ...     # DDP: rank 0 logs, evaluates and saves
    python train.py --stage 1 ... --batch-tokens 65536 --state-cache memory   # token-budget batches, states once

The run dir gets draft.safetensors (load with beagle.load_draft), state.pt (optimizer + counters, for
--resume), train.csv (one row per log interval), eval.csv (top-1 agreement with the target at draft steps
1..k, the chain tau those imply, and every --tau-interval evaluations the tau of a short greedy tree decode of a
few held-out prompts) and curves.png. A run dir that holds a run is refused unless --resume or --overwrite;
SIGINT / SIGTERM checkpoint before exiting. The target states h come from one frozen forward per batch (its
logits are never computed: the loss needs only h), or with --state-cache from a cache computed once per dataset.

A step never waits for the GPU: which positions the loss reads is decided on the host from the batch's host
masks (loss_plan), the loss and token counts stay on the device until a log line reads them, and the loss
(SoftCrossEntropy) takes the LM head's (rows, V) logits --loss-chunk rows at a time, so no (B, T, V) tensor
exists in the forward or the backward.

Stage 1 trains all k window positions at once through the inverse block mask. Stage 2 runs s simulation steps
over the same windows: step m only computes the queries at window position m (the only ones the loss reads; the
others' outputs would be discarded), and their keys are the T true states plus the draft's own states of steps
1..m-1, ~T/k of each (no key is made for a state not made yet), so step m costs ~T/k queries against
T (1 + (m-1)/k) keys. Gradients DO flow through the draft's own states: a state made at step m is a function
of the draft's weights, and the exact gradient of "draft m steps from its own states" includes how those states
change, as in autoregressive drafting itself (EAGLE-3 / HASS also backpropagate through their unrolled steps).
So that memory does not grow with s, each step's draft-layer activations are not kept but recomputed in the
backward pass (--recompute, about one more draft forward a step); what a step keeps is its inputs and its own
(B, Hkv, ~T/k, D) keys and values, and the loss an (N, dim) gradient.
"""
import csv
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
import data
from beagle import DRAFTS, DraftArgs, block_mask, check_fingerprint, load_draft, read_draft, save_draft, \
    simulation_mask, window_positions, window_start
from common import DTYPES, BeagleError, check_output, cli, device_and_dtype, write_atomic
from convert import load_target


@dataclass
class TrainConfig:
    stage: int = 1  # 1: inverse block attention (multi-token prediction); 2: training-time simulation
    # beagle | eagle2: the draft to train; eagle2 (the baseline, beagle.py) trains next-token only: --window 1,
    # stage 1
    draft: str = "beagle"
    target: str | None = None  # None: the default SmolLM2-135M-Instruct (convert.load_target)
    data: str = "data/selfgen.jsonl"  # ShareGPT JSON / JSONL
    out: str = "runs/beagle"
    init: str | None = None  # a draft checkpoint to start from (stage 2: the stage-1 draft)
    window: int = 5  # k: window length = number of draft steps trained at once
    sim_steps: int = 3  # s: stage-2 simulation steps, s <= k
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    batch_size: int = 16  # per process, in conversations (when --batch-tokens is 0)
    batch_tokens: int = 0  # N > 0: a batch holds as many length-grouped conversations as fit in N tokens incl. padding
    loss_chunk: int = 1024  # rows of the LM head's (rows, V) logits at a time in the loss (memory, not the result)
    state_cache: str = ""  # "": the target's states online (one frozen forward a batch); "memory": computed once
    #                        into the training device's memory; DIR: once into shards on disk, read a batch at a time
    lr: float = 1e-4  # the paper's 3e-5 / 2000 warm-up steps are for 7B targets and 68K conversations
    warmup: int = 500  # linear warm-up steps
    # after the warm-up: constant | cosine (to 0 at the run's end: min(--max-steps, the epochs' steps))
    schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    noise: float = 0.2  # std of the Gaussian noise on the target states used as keys/values
    vloss_weight: float = 10.0  # regression loss weight, relative to the soft cross-entropy
    eval_interval: int = 500  # steps between evaluations (and checkpoints); also at the end of every epoch
    eval_frac: float = 0.02  # held-out share of the conversations
    eval_min: int = 32  # ... but at least this many (at most a fifth of the data): agreement on 6 is noise
    eval_max_batches: int = 50
    tau_interval: int = 4  # every N-th evaluation (and the last) also decodes a few held-out prompts (0: never)
    tau_prompts: int = 4
    log_interval: int = 10
    max_len: int = 2048
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # the target's weights and the autocast dtype; auto: bfloat16 on cuda, float32 on cpu
    compile: bool = False
    # stage 2: rerun each simulation step in the backward pass instead of keeping its activations (peak memory
    # flat in s, for about one more draft forward per step)
    recompute: bool = True
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start afresh in an --out that holds a run (without it: refused)
    save_minutes: float = 0.0  # > 0: also checkpoint every this many minutes
    progress: bool = True  # tqdm bar


# -----------------------------------------------------------------------------
# the draft's part of a training step, in one module so DDP sees a single forward()

class DraftStep(nn.Module):
    def __init__(self, draft, recompute=True):
        super().__init__()
        self.draft, self.recompute = draft, recompute

    def forward(self, emb, states, window, offset, steps, queries=None):
        """emb (B, T, dim) query embeddings, states (B, T, dim) target states used as keys/values (noised when
        training). steps 0: stage 1, every query under the block mask. steps s >= 1: s simulation steps.
        queries: stage 2's per-step query positions on the device (loss_plan has them), else made here.
        Returns [(idx (n,), hat_h (B, n, dim))] per step: the positions whose states were computed."""
        T, dev = emb.shape[1], emb.device
        pos = torch.arange(T, device=dev)
        if steps == 0:
            return [(pos, self.draft(emb, pos, states, pos, block_mask(T, window, offset, dev)[None, None]))]
        k_true, v_true = self.draft.kv(states, pos)  # (B, Hkv, T, D), computed once for all steps
        wp = None if queries else window_positions(T, window, offset)  # host: the index lists need no device sync
        # the keys so far: the T true states, then each step's own states (B, Hkv, n, D), and their columns in
        # simulation_mask (the draft half's column of position i is T + i); a state not made yet gets no key
        ks, vs, cols, outs = [k_true], [v_true], [pos], []
        for m in range(1, steps + 1):
            # queries at window position m: (n,), found on the host (no device sync)
            idx = queries[m - 1] if queries else to_device((wp == m).nonzero().squeeze(1), dev)
            mask = simulation_mask(T, window, offset, m, dev)[idx][:, torch.cat(cols)][None, None]  # (1, 1, n, keys)
            # copies of the lists: a recomputed step must see the keys it saw, not the ones appended after it
            args = emb, idx, mask, m < steps, list(ks), list(vs)
            # recompute: keep only the step's inputs for backward and rerun it there, so that a step adds only its
            # own keys and values (and its output, which the loss reads), no layer activations
            hat, k_new, v_new = (checkpoint(self.sim_step, *args, use_reentrant=False)
                                 if self.recompute and torch.is_grad_enabled() else self.sim_step(*args))
            ks.append(k_new), vs.append(v_new), cols.append(T + idx)
            outs.append((idx, hat))  # hat (B, n, dim)
        return outs

    def sim_step(self, emb, idx, mask, write, ks, vs):
        """One simulation step: the queries at positions idx over the keys and values ks, vs (lists, joined along
        the sequence); with write, also the step's own states as keys and values for the next steps (else None)."""
        hat = self.draft.attend(emb[:, idx], idx, torch.cat(ks, 2), torch.cat(vs, 2), mask)
        return (hat, *self.draft.kv(hat, idx)) if write else (hat, None, None)


def to_device(x, device):
    """A host tensor on the device without a host sync: pinned, then copied asynchronously (a plain .to(cuda)
    from pageable memory waits for the GPU to drain its queue)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def label_positions(loss_mask, valid, window, offset):
    """(B, T) bool: position i is trained when token i+1 is an assistant label (q_i predicts t_{i+1}) and query i
    sees at least one TRUE target state (position 0 and the partial first window see none)."""
    T = loss_mask.shape[1]
    nxt = torch.zeros_like(loss_mask)
    nxt[:, :-1] = loss_mask[:, 1:] & valid[:, 1:]
    seen = window_start(T, window, offset, loss_mask.device) > 0  # (T,): = block_mask(...).any(-1), without (T, T)
    return nxt & valid & seen


def loss_plan(loss_mask, valid, window, offset, steps, device):
    """Which rows the loss reads, computed on the HOST from the batch's host masks (so the step needs no device
    sync to select them). Per draft step m (stage 1: one group, all T queries): (idx (n,) the step's query
    positions (stage 1: None; DraftStep's `queries`), rows (N,) into the step's flattened (B * n, dim) outputs,
    hpos (N,) into the flattened (B * T, dim) target states, coef = beta_m / (sum of beta over the steps with
    rows * N)), so that sum_m coef_m * (sum of the step's per-row losses) is the beta-weighted mean of the
    per-step means. The tensors are on `device`."""
    labels = label_positions(loss_mask, valid, window, offset)  # (B, T) host
    B, T = labels.shape
    if steps == 0:
        groups = [torch.arange(T)]
    else:
        wp = window_positions(T, window, offset)
        groups = [(wp == m).nonzero().squeeze(1) for m in range(1, steps + 1)]  # the queries of step m (n,)
    parts = []
    for m, idx in enumerate(groups, 1):
        b, j = labels[:, idx].nonzero(as_tuple=True)  # host: the N trained (row, query) pairs
        parts.append((None if steps == 0 else idx, b * len(idx) + j, b * T + idx[j],
                      1.0 if steps == 0 else float(window - m + 1)))
    w_sum = sum(beta for _, rows, _, beta in parts if len(rows)) or 1.0
    return [(None if idx is None else to_device(idx, device), to_device(rows, device), to_device(hpos, device),
             beta / (w_sum * max(len(rows), 1))) for idx, rows, hpos, beta in parts]


def soft_ce_chunk(lq, lp):
    """lq, lp (c, V) draft / target logits -> (sum over the c rows of CE(p, q), dCE/dlq = q - p in lq's dtype).
    The softmaxes read the logits in their own dtype and compute in fp32 (no separate fp32 copy of them)."""
    logq = F.log_softmax(lq, -1, dtype=torch.float32)  # (c, V)
    p = F.softmax(lp, -1, dtype=torch.float32)
    ce = -(p[:, None, :] @ logq[:, :, None]).sum()  # row-wise sums of p log q: no (c, V) temporary
    return ce, logq.exp_().sub_(p).to(lq.dtype)  # in place: q - p (p sums to 1)


class SoftCrossEntropy(torch.autograd.Function):
    """sum over rows i of CE(p_i, q_i) = -sum_v p_iv log q_iv, q = softmax(W hat_i) (the draft), p = softmax(W h_i)
    (the target: h is what its LM head reads, so its logits need not be kept), W (V, dim) the frozen LM head.
    Rows are taken `chunk` at a time, so no (N, V) tensor ever exists: the gradient w.r.t. hat, (q - p) W per row,
    is computed in the same pass, chunk by chunk, and kept as (N, dim) for backward, which only scales it.
    Nothing is recomputed, and the LM head runs three times per row (draft, target, gradient). chunk_fn: the
    per-chunk math (soft_ce_chunk, or a torch.compile of it that fuses its elementwise passes)."""

    @staticmethod
    def forward(ctx, hat, h, weight, chunk, chunk_fn=soft_ce_chunk):
        grad = torch.zeros_like(hat, dtype=torch.float32) if hat.requires_grad else None  # (N, dim)
        total = torch.zeros((), dtype=torch.float32, device=hat.device)
        for a in range(0, hat.shape[0], chunk):
            lq = F.linear(hat[a:a + chunk].to(weight.dtype), weight)  # (c, V) in the head's (autocast) dtype
            lp = F.linear(h[a:a + chunk].to(weight.dtype), weight)
            ce, g = chunk_fn(lq, lp)
            total = total + ce
            if grad is not None:
                grad[a:a + chunk] = g.to(weight.dtype) @ weight  # (c, dim)
        ctx.save_for_backward(grad)
        ctx.hat_dtype = hat.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        grad, = ctx.saved_tensors
        return (grad * g).to(ctx.hat_dtype), None, None, None, None


def draft_loss(output, outs, h, plan, vloss_weight, chunk=1024, chunk_fn=soft_ce_chunk):
    """Soft cross-entropy of the draft vs the target distribution + vloss_weight * smooth-L1(hat_h, h) over the
    rows of `plan` (loss_plan), each step's mean weighted by its coef. output = the target's frozen LM head,
    h (B, T, dim) the target's states. Returns (loss, ce, vloss), ce and vloss detached: all three stay on the
    device (reading them is a host sync; the training loop does it at log intervals only)."""
    hs = h.reshape(-1, h.shape[-1])  # (B * T, dim)
    total = ce_sum = vl_sum = 0.0
    for (_, hat), (_, rows, hpos, coef) in zip(outs, plan):
        hh, ht = hat.reshape(-1, hat.shape[-1])[rows], hs[hpos]  # (N, dim) gathers: fixed by the host plan
        ce = SoftCrossEntropy.apply(hh, ht, output.weight, chunk, chunk_fn)
        vl = F.smooth_l1_loss(hh.float(), ht.float(), reduction="none").mean(-1).sum()
        total, ce_sum, vl_sum = total + coef * (ce + vloss_weight * vl), ce_sum + coef * ce.detach(), \
            vl_sum + coef * vl.detach()
    return total, ce_sum, vl_sum


@torch.no_grad()
def greedy_tokens(output, x, chunk=1024):
    """argmax of output(x) for x (N, dim), `chunk` rows at a time: (N,) long, no (N, V) tensor."""
    return torch.cat([output(x[a:a + chunk]).argmax(-1) for a in range(0, x.shape[0], chunk)] or
                     [torch.zeros(0, dtype=torch.long, device=x.device)])


def chain_tau(acc):
    """Expected tokens per target forward of a chain drafted with per-step agreements a_1..a_k (step d accepted
    only when all before it were): 1 + sum_d a_1 * ... * a_d, the bonus token counted."""
    tau, run = 1.0, 1.0
    for a in acc:
        run *= a
        tau += run
    return tau


@torch.no_grad()
def evaluate(target, draft, examples, cfg, pad_id, device, amp):
    """Top-1 agreement of the draft with the target at draft steps 1..k: step m = window position m of a
    k-step simulation (m-1 own draft states), i.e. what autoregressive drafting sees. Every batch is scored at
    all k offsets, so every position plays every role. Returns k floats (nan where nothing was counted)."""
    k = cfg.window
    hits, counts = torch.zeros(k, device=device), [0] * k
    step = DraftStep(draft)
    for bi, (ids, loss_mask, valid) in enumerate(data.batches(examples, cfg.batch_size, False, pad_id=pad_id)):
        if bi >= cfg.eval_max_batches:
            break
        ids_d = to_device(ids, device)
        _, h = target(ids_d, last_only=True)  # only h: the target's choice is argmax output(h), row by row below
        want = greedy_tokens(target.output, h.reshape(-1, h.shape[-1]), cfg.loss_chunk)  # (B * T,)
        emb = target.tok_embeddings(ids_d)
        steps = k if k > 1 else 0  # one step: next-token drafting, the stage-1 forward (what --draft eagle2 has)
        for offset in range(k):  # every offset: each position is scored at every draft step
            plan = loss_plan(loss_mask, valid, k, offset, steps, device)
            with amp:
                outs = step(emb, h, k, offset, steps, [q for q, _, _, _ in plan] if steps else None)
            for m, ((_, hat), (_, rows, hpos, _)) in enumerate(zip(outs, plan)):
                got = greedy_tokens(target.output, hat.reshape(-1, hat.shape[-1])[rows].to(h.dtype), cfg.loss_chunk)
                hits[m] += (got == want[hpos]).sum()
                counts[m] += len(rows)
    hits = hits.tolist()  # the one readback of the evaluation
    return [hits[m] / counts[m] if counts[m] else float("nan") for m in range(k)]


@torch.no_grad()
def measured_tau(target, draft, prompts, stop_ids, max_new=64):
    """Mean tokens per target forward of greedy tree decoding (decode.py's GPU tree, or on the CPU its fixed CPU_TREE:
    one shape for every machine, so taus compare) with a copy of the draft in the target's dtype, over a few
    prompts: what the agreements are a proxy for."""
    import copy
    import decode
    dev, dtype = target.output.weight.device, target.output.weight.dtype
    depth, top_k, tree_tokens = decode.GPU_TREE if dev.type == "cuda" else decode.CPU_TREE
    cfg = decode.DecodeConfig(mode="tree", depth=depth, top_k=top_k, tree_tokens=tree_tokens, max_new_tokens=max_new,
                              device=str(dev), dtype=str(dtype).removeprefix("torch."), cuda_graph=False,
                              compile=False)
    decode.resolve(cfg)
    d = copy.deepcopy(draft).to(dtype).eval()  # (its RoPE table too, rounded as load_draft rounds it)
    d.set_vocab(target, 0)  # the whole vocabulary
    acc = []  # draft tokens accepted per verification
    for prompt in prompts:
        acc += decode.generate_spec(target, d, prompt, cfg, stop_ids).accepted_lengths
    return 1 + sum(acc) / len(acc) if acc else 1.0  # decode.Result.tau over all verifications


# -----------------------------------------------------------------------------
# files in the run dir

def append_csv(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr, ev = read_csv(os.path.join(out, "train.csv")), read_csv(os.path.join(out, "eval.csv"))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "ce", "vloss"):
        a.plot([r["step"] for r in tr], [r[key] for r in tr], label=key)
    a.set_xlabel("step"), a.set_yscale("log"), a.set_title("training loss"), a.legend()
    for key in (ev[0] if ev else {}):
        if key.startswith("acc"):  # held-out solid; the same on training conversations dashed, same colour
            line, = b.plot([r["step"] for r in ev], [r[key] for r in ev], marker=".", label=f"draft step {key[3:]}")
            if "train_" + key in ev[0]:
                b.plot([r["step"] for r in ev], [r["train_" + key] for r in ev], ls="--", color=line.get_color())
    b.set_xlabel("step"), b.set_ylabel("top-1 agreement"), b.legend()
    b.set_title("agreement with the target: held-out (solid), training (dashed)")
    fig.tight_layout()
    write_atomic(os.path.join(out, "curves.png"), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def save_checkpoint(cfg, draft, target, opt, step, epoch, batch):
    save_draft(os.path.join(cfg.out, "draft.safetensors"), draft, target,
               extra={"stage": cfg.stage, "step": step, "window": cfg.window, "sim_steps": cfg.sim_steps})
    state = {"opt": opt.state_dict(), "step": step, "epoch": epoch, "batch": batch, "config": asdict(cfg)}
    write_atomic(os.path.join(cfg.out, "state.pt"), lambda tmp: torch.save(state, tmp))


def trim_csv(path, step):
    """Drop the rows written after `step` (a resumed run writes them again)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if float(r[0]) <= step]
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)
    write_atomic(path, write)


# -----------------------------------------------------------------------------

class Interrupted(Exception):
    """SIGINT / SIGTERM: the run stopped after a checkpoint; __main__ prints the message alone."""


def step_randomness(cfg, step, rank, window, device):
    """Per-step offset and noise generator derived from (seed, step, rank): resuming reproduces them exactly
    without saving any RNG state."""
    offset = random.Random(cfg.seed * 1_000_003 + step * 101 + rank).randrange(window)
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed * 7_919 + step * 31 + rank + 1)
    return offset, g


def check_config(cfg):
    if cfg.stage not in (1, 2) or cfg.window < 1 or (cfg.stage == 2 and not 1 <= cfg.sim_steps <= cfg.window):
        raise BeagleError(f"need --stage 1|2 and 1 <= --sim-steps <= --window (got stage {cfg.stage}, "
                          f"sim-steps {cfg.sim_steps}, window {cfg.window})")
    if cfg.draft not in DRAFTS:
        raise BeagleError(f"--draft must be one of {' | '.join(DRAFTS)} (got {cfg.draft!r})")
    if cfg.draft == "eagle2" and (cfg.stage != 1 or cfg.window != 1):
        raise BeagleError("--draft eagle2 trains next-token only, as EAGLE-2 does: give --stage 1 --window 1")
    if cfg.schedule not in ("constant", "cosine"):
        raise BeagleError(f"--schedule must be constant | cosine (got {cfg.schedule!r})")
    if cfg.resume and cfg.init:
        raise BeagleError("--resume continues the run in --out; drop --init")
    if cfg.resume and cfg.overwrite:
        raise BeagleError("--resume continues the run in --out, --overwrite replaces it: give one")
    common.check_at_least(cfg, dict(batch_size=1, batch_tokens=0, loss_chunk=1, epochs=1, max_steps=0, warmup=0,
                                    eval_interval=1, eval_min=0, eval_max_batches=1, log_interval=1, max_len=2,
                                    tau_interval=0, tau_prompts=1))
    for name in ("lr", "grad_clip", "noise", "vloss_weight", "weight_decay", "save_minutes", "eval_frac"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0 or (name == "eval_frac" and value >= 1):
            raise BeagleError(f"--{name.replace('_', '-')} must be a finite number "
                              + ("in [0, 1)" if name == "eval_frac" else ">= 0") + f", got {value}")
    if cfg.grad_clip == 0:  # clip_grad_norm_ to 0 zeroes every gradient: nothing would be learned
        raise BeagleError("--grad-clip must be > 0 (the largest gradient norm a step applies), got 0.0")
    check_output(cfg.out, "--out", directory=True)
    if cfg.state_cache not in ("", "memory"):
        check_output(cfg.state_cache, "--state-cache", directory=True)
    if cfg.resume and not os.path.exists(os.path.join(cfg.out, "state.pt")):
        raise BeagleError(f"--resume: no {os.path.join(cfg.out, 'state.pt')} to resume from")
    if cfg.init and os.path.isdir(cfg.init):  # (a run's directory: its draft is a file in it)
        raise BeagleError(f"--init {cfg.init} is a directory; give a draft checkpoint, e.g. "
                          f"{os.path.join(cfg.init, 'draft.safetensors')}")
    if cfg.init and not os.path.isfile(cfg.init):
        raise BeagleError(f"--init: no draft checkpoint at {cfg.init}")
    if cfg.stage == 2 and not cfg.init and not cfg.resume:
        print("warning: stage 2 without --init starts from a random draft (the paper starts from stage 1)")


def lr_at(cfg, step, total):
    """The learning rate of optimizer step `step` (from 0) of `total`: a linear warm-up, then constant or a cosine
    that reaches 0 at step `total`, just past the last. A function of the step alone: --resume keeps the curve."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.schedule == "cosine" and step >= cfg.warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, total - cfg.warmup)))
    return lr


def stopping(stop, step, cfg, world, device):
    """Whether to checkpoint and exit now. One process: right after the step a signal arrived in. DDP: the ranks
    agree at log intervals only (one all-reduce, a host sync, where the log line syncs anyway), so all of them
    stop after the same step, whichever got the signal."""
    if world == 1:
        return bool(stop)
    if step % cfg.log_interval:
        return False
    flag = torch.tensor([float(bool(stop))], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


def first_prompts(examples, n):
    """The first user turn of up to n conversations, as the chat template renders it up to the assistant's
    first token (the tokens before the first loss label)."""
    out = []
    for ids, mask in examples:
        if True in mask and len(out) < n:
            out.append(list(ids[:mask.index(True)]))
    return out


def resume(cfg, target, draft, opt, device, master):
    """--resume: the run's draft and optimizer state loaded into `draft` and `opt`, after checking that the
    checkpoint is whole and that it is the same run; its CSVs cut back to the checkpoint. -> (step, epoch, batch)"""
    state_path = os.path.join(cfg.out, "state.pt")
    if not os.path.exists(state_path):
        raise BeagleError(f"--resume: no {state_path} to resume from")
    tensors, meta = read_draft(os.path.join(cfg.out, "draft.safetensors"))
    check_fingerprint(json.loads(meta["target"]), target)
    st = torch.load(state_path, map_location=device, weights_only=True)
    if json.loads(meta["extra"]).get("step") != st["step"]:  # a crash between the two atomic writes
        raise BeagleError(f"{cfg.out}: draft.safetensors and state.pt are from different steps")
    kept = ("draft", "stage", "window", "sim_steps", "batch_size", "batch_tokens", "seed", "noise", "vloss_weight",
            "schedule")
    changed = [k for k in kept if st["config"].get(k, getattr(TrainConfig, k)) != getattr(cfg, k)]
    if changed:  # these change what the remaining steps compute: not a continuation any more
        raise BeagleError(f"--resume with a different --{changed[0].replace('_', '-')} than the run in {cfg.out}")
    tensors.pop("vocab", None)  # the token ranking: recomputed from the data
    draft.load_state_dict(tensors)
    opt.load_state_dict(st["opt"])
    if master:
        for f in ("train.csv", "eval.csv"):
            trim_csv(os.path.join(cfg.out, f), st["step"])
    return st["step"], st["epoch"], st["batch"]


def log_evaluation(cfg, target, draft, tokenizer, sets, device, amp, say, step, epoch, frac):
    """Agreement at draft steps 1..window on the held-out and the seen examples, the chain tau it implies and,
    given prompts, the tau of a short tree decode on them: printed and appended to eval.csv. -> held-out agreement"""
    (eval_ex, seen_ex, prompts), pad_id = sets, tokenizer.pad_id if tokenizer.pad_id is not None else 0
    acc = evaluate(target, draft, eval_ex, cfg, pad_id, device, amp)
    seen = evaluate(target, draft, seen_ex, cfg, pad_id, device, amp)
    tau = measured_tau(target, draft, prompts, tokenizer.stop_ids) if prompts else float("nan")
    say(f"eval step {step} | top-1 agreement at draft steps 1..{cfg.window}: held-out "
        + " ".join(f"{a:.3f}" for a in acc) + " | train " + " ".join(f"{a:.3f}" for a in seen)
        + f" | chain tau {chain_tau(acc):.2f}" + (f" | tree tau {tau:.2f} on {len(prompts)} prompts" if tau == tau
                                                  else ""))
    append_csv(os.path.join(cfg.out, "eval.csv"), {
        "step": step, "epoch": epoch, "epochs": round(epoch + frac, 3), **{f"acc{m + 1}": a for m, a in enumerate(acc)},
        **{f"train_acc{m + 1}": a for m, a in enumerate(seen)}, "tau_chain": round(chain_tau(acc), 4),
        "tau": round(tau, 4)})
    return acc


def train(cfg, target, tokenizer, device="cpu", rank=0, world=1):
    """The training loop for an already loaded frozen target (tests call it with a tiny one)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    amp_dtype = {"auto": torch.bfloat16}.get(cfg.dtype, DTYPES.get(cfg.dtype))  # autocast: bf16 / fp16 only
    amp_dtype = amp_dtype if amp_dtype in (torch.bfloat16, torch.float16) else None
    amp = torch.autocast("cuda", dtype=amp_dtype) if cuda and amp_dtype else nullcontext()
    master = rank == 0
    check_config(cfg)
    run_files = [os.path.join(cfg.out, f) for f in ("draft.safetensors", "state.pt")]
    if not cfg.resume and any(os.path.exists(f) for f in run_files):
        if not cfg.overwrite:
            raise BeagleError(f"{cfg.out} holds a run: --resume continues it, --overwrite starts afresh")
        if master:  # a fresh run: its CSVs must not continue the old one's
            for f in ("train.csv", "eval.csv"):
                if os.path.exists(os.path.join(cfg.out, f)):
                    os.remove(os.path.join(cfg.out, f))
    target.requires_grad_(False).eval()
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    examples = data.tokenize_all(tokenizer, data.load_conversations(cfg.data, verbose=master), cfg.max_len,
                                 verbose=master)
    longest = max(len(ids) for ids, _ in examples)
    if cfg.window > longest:  # (its draft steps past the longest example: never trained, evaluated k x k times)
        raise BeagleError(f"--window {cfg.window} is longer than the longest example ({longest} tokens): its last "
                          "draft steps would never be trained; make it shorter (5: the default)")
    train_ex, eval_ex = data.split(examples, cfg.eval_frac, cfg.seed, cfg.eval_min)
    seen_ex = train_ex[:max(len(eval_ex), 16)]  # scored like the held-out split: the gap shows memorisation
    prompts = first_prompts(eval_ex, cfg.tau_prompts)

    torch.manual_seed(cfg.seed)
    draft = DRAFTS[cfg.draft](DraftArgs.from_target(target.args)).to(device)  # fp32 master weights; autocast
    if cfg.init:
        init = load_draft(cfg.init, target)
        if type(init) is not type(draft):
            raise BeagleError(f"--init {cfg.init} is not a {cfg.draft} draft (--draft)")
        draft.load_state_dict(init.state_dict())
    draft.vocab = data.token_ranking(train_ex, target.args.vocab_size)  # saved with it (beagle.py, VOCAB)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                            fused=cuda)
    # batch: index (in optimizer steps) of the next step inside the epoch
    step, epoch, batch = resume(cfg, target, draft, opt, device, master) if cfg.resume else (0, 0, 0)
    os.makedirs(cfg.out, exist_ok=True)

    cache = None
    if cfg.state_cache:
        path = None if cfg.state_cache == "memory" else cfg.state_cache
        if path and world > 1 and not master:
            torch.distributed.barrier()  # rank 0 writes a disk cache, the others then read it
        cache = data.StateCache(target, train_ex, device, path)
        if path and world > 1 and master:
            torch.distributed.barrier()

    model, target_forward, chunk_fn = DraftStep(draft, cfg.recompute), target, soft_ce_chunk
    if cfg.compile:  # the draft's step, the frozen forward and the loss's per-chunk math (its loop stays eager)
        model = torch.compile(model, dynamic=True)
        target_forward = torch.compile(target, dynamic=True)
        chunk_fn = torch.compile(soft_ce_chunk, dynamic=True)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    steps = 0 if cfg.stage == 1 else cfg.sim_steps
    lengths = [len(ids) for ids, _ in train_ex]
    plan_of = lambda e: data.batch_plan(lengths, cfg.batch_size, True, cfg.seed, e, batch_tokens=cfg.batch_tokens)
    # steps per epoch: the same every epoch for --batch-size; with --batch-tokens the plan (and its length)
    # differs from epoch to epoch
    per_epoch = [len(plan_of(e)) // world for e in range(cfg.epochs if cfg.batch_tokens else 1)]
    per_epoch = per_epoch * (1 if cfg.batch_tokens else cfg.epochs)
    if min(per_epoch, default=0) == 0:
        raise BeagleError(f"{len(train_ex)} training examples make no batch of {cfg.batch_size} on {world} ranks")
    total = sum(per_epoch) if not cfg.max_steps else min(cfg.max_steps, sum(per_epoch))
    if master:
        n_params = sum(p.numel() for p in draft.parameters())
        print(f"stage {cfg.stage}: {len(train_ex)} train / {len(eval_ex)} held-out conversations, {per_epoch[0]} "
              f"steps/epoch, {total} steps, draft {n_params / 1e6:.2f}M params, window {cfg.window}"
              + (f", {cfg.sim_steps} simulation steps" if cfg.stage == 2 else "") + f", {device}"
              + (f", states cached ({cfg.state_cache})" if cfg.state_cache else ""))
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, leave=False)
    say = bar.write if bar else print
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    stop = []  # a signal's name, once one arrived: finish the step, checkpoint, exit
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, lambda n, _: stop.append(signal.Signals(n).name))
        except ValueError:  # not the main thread: no handlers
            pass
    n_evals, acc, last = step // cfg.eval_interval, [], None
    zero = lambda: torch.zeros(3, device=device)
    t0, tokens, sums, n_sum, saved_at = time.time(), 0, zero(), 0, time.time()
    try:
        while step < total:
            if batch >= per_epoch[epoch]:
                epoch, batch = epoch + 1, 0
            # one pass over the epoch's plan from the next unseen batch; step n of an epoch takes plan[n * world + rank]
            plan = plan_of(epoch)
            while batch < per_epoch[epoch] and step < total:
                idx = plan[batch * world + rank]
                ids, loss_mask, valid = data.collate([train_ex[i] for i in idx], pad_id)  # host
                offset, g = step_randomness(cfg, step, rank, cfg.window, device)
                ids_d = to_device(ids, device)
                with torch.no_grad():
                    if cache is not None:
                        h = cache.batch(idx, ids.shape[1])  # (B, T, dim)
                    else:  # (B, T, dim): causal, so right padding changes nothing real; no (B, T, V) logits
                        _, h = target_forward(ids_d, last_only=True)
                    emb = target.tok_embeddings(ids_d)
                    noisy = h + cfg.noise * torch.randn(h.shape, generator=g, device=device, dtype=h.dtype)
                lp = loss_plan(loss_mask, valid, cfg.window, offset, steps, device)
                lr = lr_at(cfg, step, total)
                for group in opt.param_groups:
                    group["lr"] = lr
                with amp:
                    outs = model(emb, noisy, cfg.window, offset, steps, [q for q, _, _, _ in lp] if steps else None)
                    loss, ce, vl = draft_loss(target.output, outs, h, lp, cfg.vloss_weight, cfg.loss_chunk, chunk_fn)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sums += torch.stack([loss.detach().float(), ce.float(), vl.float()])  # on the device: no sync
                n_sum += 1
                step, batch, tokens = step + 1, batch + 1, tokens + int(valid.sum()) * world  # valid: host
                if bar:
                    bar.update(1)
                if master and (step % cfg.log_interval == 0 or step == total):
                    last = [x / n_sum for x in sums.tolist()]  # the one readback of the interval
                    dt = time.time() - t0
                    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
                    say(f"step {step:6d} | epoch {epoch:2d} | loss {last[0]:.4f} | ce {last[1]:.4f} | "
                        f"vloss {last[2]:.4f} | lr {lr:.2e} | {tokens / dt:7.0f} tok/s | peak mem {mem:.2f} GiB")
                    append_csv(os.path.join(cfg.out, "train.csv"), {"step": step, "epoch": epoch, "loss": last[0],
                                                                      "ce": last[1], "vloss": last[2], "lr": lr})
                    t0, tokens, sums, n_sum = time.time(), 0, zero(), 0
                if step % cfg.eval_interval == 0 or step == total or batch == per_epoch[epoch]:
                    if master:
                        if eval_ex:
                            n_evals += 1
                            tau_now = cfg.tau_interval and (n_evals % cfg.tau_interval == 0 or step == total)
                            sets = eval_ex, seen_ex, prompts if tau_now else []
                            acc = log_evaluation(cfg, target, draft, tokenizer, sets, device, amp, say, step, epoch,
                                                 batch / per_epoch[epoch])
                        save_checkpoint(cfg, draft, target, opt, step, epoch, batch)
                        saved_at = time.time()
                        plot(cfg.out)
                        t0, tokens = time.time(), 0  # keep evaluation out of the next tokens/s
                    if world > 1:
                        torch.distributed.barrier()
                elif master and cfg.save_minutes > 0 and time.time() - saved_at >= 60 * cfg.save_minutes:
                    save_checkpoint(cfg, draft, target, opt, step, epoch, batch)
                    saved_at = time.time()
                if stopping(stop, step, cfg, world, device):
                    if master:
                        save_checkpoint(cfg, draft, target, opt, step, epoch, batch)
                    raise Interrupted(f"{stop[0]} at step {step}: checkpoint in {cfg.out} (--resume continues)")
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        if bar:
            bar.close()
    if master:
        print(f"done: {step} steps, stage {cfg.stage}, final loss "
              + (f"{last[0]:.4f}" if last else "n/a") + ", held-out agreement "
              + " ".join(f"{a:.3f}" for a in acc) + f" -> {os.path.join(cfg.out, 'draft.safetensors')}")
    return draft


def main(cfg):
    check_config(cfg)  # before the (possibly slow) target load
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    with common.ranks(device) as (rank, world, device):  # DDP under torchrun
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True  # the paper trains in TF32 / mixed precision
        target, tokenizer = load_target(cfg.target, device=device, dtype=dtype)
        train(cfg, target, tokenizer, device, rank, world)


if __name__ == "__main__":
    try:
        main(cli(TrainConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
