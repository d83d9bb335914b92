"""
Two-stage block-attention training of the Beagle draft against a frozen target (PAPER.md, "Training").

    python train.py --stage 1 --data data/selfgen.jsonl --out runs/s1 --epochs 10 --device cuda
    python train.py --stage 2 --data data/selfgen.jsonl --init runs/s1/draft.safetensors --out runs/s2 --epochs 10
    python train.py --stage 1 ... --max-steps 1000 ; python train.py --stage 1 ... --resume   # continue exactly
    torchrun --standalone --nproc-per-node 8 train.py --stage 1 ...     # DDP: rank 0 logs, evaluates and saves
    python train.py --measure-memory --data data/selfgen.jsonl --device cuda   # peak memory of stage 2, s = 1..6

The run dir gets draft.safetensors (load with beagle.load_draft), state.pt (optimizer + counters, for
--resume), train.csv (one row per log interval), eval.csv (top-1 agreement with the target at draft steps
1..k) and curves.png. The target states h are computed on the fly (no offline dump): one frozen forward per batch.

Stage 1 trains all k window positions at once through the inverse block mask. Stage 2 runs s simulation steps
over the same windows with one extra key/value buffer of sequence length that holds the draft's own states:
step m only computes the queries at window position m (the only ones the loss reads; the others' outputs
would be discarded), so step m costs ~T/k queries against 2T keys. Gradients DO flow through the buffer: the
state written at step m is a function of the draft's weights, and the exact gradient of "draft m steps from
its own states" includes how those states change, as in autoregressive drafting itself (EAGLE-3 / HASS also
backpropagate through their unrolled steps). The cost is that every step's activations are kept for backward.
"""
import csv
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from beagle import Beagle, DraftArgs, block_mask, check_fingerprint, load_draft, read_draft, save_draft, \
    simulation_mask, window_positions
from llama import DTYPES, BeagleError, cli, device_and_dtype, load_target


@dataclass
class TrainConfig:
    stage: int = 1  # 1: inverse block attention (multi-token prediction); 2: training-time simulation
    target: str | None = None  # None: the default SmolLM2-135M-Instruct (llama.load_target)
    data: str = "data/selfgen.jsonl"  # ShareGPT JSON / JSONL
    out: str = "runs/beagle"
    init: str | None = None  # a draft checkpoint to start from (stage 2: the stage-1 draft)
    window: int = 5  # k: window length = number of draft steps trained at once
    sim_steps: int = 3  # s: stage-2 simulation steps, s <= k
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps in total (0: no limit)
    batch_size: int = 16  # per process
    lr: float = 1e-4  # the paper's 3e-5 / 2000 warm-up steps are for 7B targets and 68K conversations
    warmup: int = 500  # linear warm-up steps, then constant
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    noise: float = 0.2  # std of the Gaussian noise on the target states used as keys/values
    vloss_weight: float = 10.0  # regression loss weight, relative to the soft cross-entropy
    eval_interval: int = 500  # steps between evaluations (and checkpoints); also at the end of every epoch
    eval_frac: float = 0.02  # held-out share of the conversations
    eval_min: int = 32  # ... but at least this many (at most a fifth of the data): agreement on 6 is noise
    eval_max_batches: int = 50
    log_interval: int = 10
    max_len: int = 2048
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # the target's weights and the autocast dtype; auto: bfloat16 on cuda, float32 on cpu
    compile: bool = False
    seed: int = 0
    resume: bool = False
    measure_memory: bool = False
    progress: bool = True  # tqdm bar


# -----------------------------------------------------------------------------
# the draft's part of a training step, in one module so DDP sees a single forward()

class DraftStep(nn.Module):
    def __init__(self, draft):
        super().__init__()
        self.draft = draft

    def forward(self, emb, states, window, offset, steps):
        """emb (B, T, dim) query embeddings, states (B, T, dim) target states used as keys/values (noised when
        training). steps 0: stage 1, every query under the block mask. steps s >= 1: s simulation steps.
        Returns [(idx (n,), hat_h (B, n, dim))] per step: the positions whose states were computed."""
        T, dev = emb.shape[1], emb.device
        pos = torch.arange(T, device=dev)
        if steps == 0:
            return [(pos, self.draft(emb, pos, states, pos, block_mask(T, window, offset, dev)[None, None]))]
        k_true, v_true = self.draft.kv(states, pos)  # (B, Hkv, T, D), computed once for all steps
        k_buf, v_buf = torch.zeros_like(k_true), torch.zeros_like(v_true)  # draft-state keys, filled step by step
        wp = window_positions(T, window, offset)  # on the host: the index lists below need no device sync
        outs = []
        for m in range(1, steps + 1):
            idx = (wp == m).nonzero().squeeze(1).to(dev)  # queries at window position m: (n,)
            mask = simulation_mask(T, window, offset, m, dev)[idx][None, None]  # (1, 1, n, 2T)
            hat = self.draft.attend(emb[:, idx], idx, torch.cat([k_true, k_buf], 2), torch.cat([v_true, v_buf], 2),
                                    mask)  # (B, n, dim)
            outs.append((idx, hat))
            if m < steps:  # write this step's states into the buffer at their own positions (out of place)
                k_new, v_new = self.draft.kv(hat, idx)
                k_buf, v_buf = k_buf.index_copy(2, idx, k_new), v_buf.index_copy(2, idx, v_new)
        return outs


def label_positions(loss_mask, valid, window, offset):
    """(B, T) bool: position i is trained when token i+1 is an assistant label (q_i predicts t_{i+1}) and query i
    sees at least one TRUE target state (position 0 and the partial first window see none)."""
    T = loss_mask.shape[1]
    nxt = torch.zeros_like(loss_mask)
    nxt[:, :-1] = loss_mask[:, 1:] & valid[:, 1:]
    seen = block_mask(T, window, offset, loss_mask.device).any(-1)  # (T,)
    return nxt & valid & seen


def draft_loss(output, outs, logits, h, labels, window, stage, vloss_weight):
    """Soft cross-entropy of the draft vs the target distribution + vloss_weight * smooth-L1(hat_h, h), averaged
    over the trained positions of each step; stage 2 weights step m by beta_m = k - m + 1 (normalised to sum 1
    over the steps that have positions). output = the target's frozen LM head. Returns (loss, ce, vloss)."""
    total, ce_sum, vl_sum, w_sum = 0.0, 0.0, 0.0, 0.0
    for m, (idx, hat) in enumerate(outs, 1):
        sel = labels[:, idx]  # (B, n)
        if not sel.any():
            total = total + 0.0 * hat.sum()  # keeps every parameter in the graph (DDP)
            continue
        b, j = sel.nonzero(as_tuple=True)  # the N trained (row, query) pairs of this step
        hh = hat[b, j]  # (N, dim)
        logq = output(hh).float().log_softmax(-1)  # (N, V)
        p = logits[b, idx[j]].float().softmax(-1)  # gathers N rows only, never a (B, n, V) copy
        ce = -(p * logq).sum(-1).mean()
        vl = F.smooth_l1_loss(hh.float(), h[b, idx[j]].float(), reduction="none").mean(-1).mean()
        w = 1.0 if stage == 1 else float(window - m + 1)
        total, ce_sum, vl_sum, w_sum = total + w * (ce + vloss_weight * vl), ce_sum + w * ce.detach(), \
            vl_sum + w * vl.detach(), w_sum + w
    w_sum = w_sum or 1.0  # no trained position at all: the loss is 0 (and still has a graph)
    return total / w_sum, float(ce_sum / w_sum), float(vl_sum / w_sum)


@torch.no_grad()
def evaluate(target, draft, examples, cfg, pad_id, device, amp):
    """Top-1 agreement of the draft with the target at draft steps 1..k: step m = window position m of a
    k-step simulation (m-1 own draft states), i.e. what autoregressive drafting sees. Every batch is scored at
    all k offsets, so every position plays every role. Returns k floats (nan where nothing was counted)."""
    k = cfg.window
    hits, counts = torch.zeros(k), torch.zeros(k)
    step = DraftStep(draft)
    for bi, (ids, loss_mask, valid) in enumerate(data.batches(examples, cfg.batch_size, False, pad_id=pad_id)):
        if bi >= cfg.eval_max_batches:
            break
        ids, loss_mask, valid = ids.to(device), loss_mask.to(device), valid.to(device)
        logits, h = target(ids)
        emb = target.tok_embeddings(ids)
        for offset in range(k):  # every offset: each position is scored at every draft step
            labels = label_positions(loss_mask, valid, k, offset)
            with amp:
                outs = step(emb, h, k, offset, k)
            for m, (idx, hat) in enumerate(outs):
                b, j = labels[:, idx].nonzero(as_tuple=True)
                agree = target.output(hat[b, j].to(h.dtype)).argmax(-1) == logits[b, idx[j]].argmax(-1)
                hits[m] += agree.sum().item()
                counts[m] += len(b)
    return (hits / counts).tolist()


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
    tmp = os.path.join(out, f"curves.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, os.path.join(out, "curves.png"))


def save_checkpoint(cfg, draft, target, opt, step, epoch, batch):
    save_draft(os.path.join(cfg.out, "draft.safetensors"), draft, target,
               extra={"stage": cfg.stage, "step": step, "window": cfg.window, "sim_steps": cfg.sim_steps})
    tmp = os.path.join(cfg.out, f"state.{os.getpid()}.tmp")
    torch.save({"opt": opt.state_dict(), "step": step, "epoch": epoch, "batch": batch, "config": asdict(cfg)}, tmp)
    os.replace(tmp, os.path.join(cfg.out, "state.pt"))


# -----------------------------------------------------------------------------

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
    if cfg.resume and cfg.init:
        raise BeagleError("--resume continues the run in --out; drop --init")
    if cfg.stage == 2 and not cfg.init and not cfg.resume and not cfg.measure_memory:
        print("warning: stage 2 without --init starts from a random draft (the paper starts from stage 1)")


def train(cfg, target, tokenizer, device="cpu", rank=0, world=1):
    """The training loop for an already loaded frozen target (tests call it with a tiny one)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    amp_dtype = {"auto": torch.bfloat16}.get(cfg.dtype, DTYPES.get(cfg.dtype))  # autocast: bf16 / fp16 only
    amp_dtype = amp_dtype if amp_dtype in (torch.bfloat16, torch.float16) else None
    amp = torch.autocast("cuda", dtype=amp_dtype) if cuda and amp_dtype else nullcontext()
    master = rank == 0
    check_config(cfg)
    target.requires_grad_(False).eval()
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    examples = data.tokenize_all(tokenizer, data.load_conversations(cfg.data, verbose=master), cfg.max_len,
                                 verbose=master)
    train_ex, eval_ex = data.split(examples, cfg.eval_frac, cfg.seed, cfg.eval_min)
    seen_ex = train_ex[:max(len(eval_ex), 16)]  # scored like the held-out split: the gap shows memorisation

    torch.manual_seed(cfg.seed)
    draft = Beagle(DraftArgs.from_target(target.args)).to(device)  # fp32 master weights; autocast on GPU
    if cfg.init:
        draft.load_state_dict(load_draft(cfg.init, target).state_dict())
    draft.vocab = data.token_ranking(train_ex, target.args.vocab_size)  # saved with it (beagle.py, VOCAB)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, epoch, batch = 0, 0, 0  # batch: index (in optimizer steps) of the next step inside the epoch
    state_path = os.path.join(cfg.out, "state.pt")
    if cfg.resume:
        if not os.path.exists(state_path):
            raise BeagleError(f"--resume: no {state_path} to resume from")
        tensors, meta = read_draft(os.path.join(cfg.out, "draft.safetensors"))
        check_fingerprint(json.loads(meta["target"]), target)
        st = torch.load(state_path, map_location=device, weights_only=True)
        if json.loads(meta["extra"]).get("step") != st["step"]:  # a crash between the two atomic writes
            raise BeagleError(f"{cfg.out}: draft.safetensors and state.pt are from different steps")
        changed = [k for k in ("stage", "window", "sim_steps", "batch_size", "seed", "noise", "vloss_weight")
                   if st["config"][k] != getattr(cfg, k)]
        if changed:  # these change what the remaining steps compute: not a continuation any more
            raise BeagleError(f"--resume with a different --{changed[0].replace('_', '-')} than the run in {cfg.out}")
        tensors.pop("vocab", None)  # the token ranking: recomputed from the data above
        draft.load_state_dict(tensors)
        opt.load_state_dict(st["opt"])
        step, epoch, batch = st["step"], st["epoch"], st["batch"]
    os.makedirs(cfg.out, exist_ok=True)

    model = DraftStep(draft)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    steps = 0 if cfg.stage == 1 else cfg.sim_steps
    lengths = [len(ids) for ids, _ in train_ex]
    per_epoch = len(data.batch_plan(lengths, cfg.batch_size, True, cfg.seed, 0)) // world  # same every epoch
    if per_epoch == 0:
        raise BeagleError(f"{len(train_ex)} training examples make no batch of {cfg.batch_size} on {world} ranks")
    total = cfg.epochs * per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * per_epoch)
    if master:
        n_params = sum(p.numel() for p in draft.parameters())
        print(f"stage {cfg.stage}: {len(train_ex)} train / {len(eval_ex)} held-out conversations, {per_epoch} "
              f"steps/epoch, {total} steps, draft {n_params / 1e6:.2f}M params, window {cfg.window}"
              + (f", {cfg.sim_steps} simulation steps" if cfg.stage == 2 else "") + f", {device}")
    bar = None
    if master and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, dynamic_ncols=True, leave=False)
    say = bar.write if bar else print
    t0, tokens, acc = time.time(), 0, []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loss = None
    while step < total:
        if batch >= per_epoch:
            epoch, batch = epoch + 1, 0
        # one pass over the epoch's plan from the next unseen batch; step n of the epoch takes plan[n * world + rank]
        it = data.batches(train_ex, cfg.batch_size, True, cfg.seed, epoch, pad_id, skip=batch * world)
        while batch < per_epoch and step < total:
            ids, loss_mask, valid = (x.to(device) for x in [next(it) for _ in range(world)][rank])
            offset, g = step_randomness(cfg, step, rank, cfg.window, device)
            with torch.no_grad():
                logits, h = target(ids)  # (B, T, V), (B, T, dim): causal, so right padding changes nothing real
                emb = target.tok_embeddings(ids)
                noisy = h + cfg.noise * torch.randn(h.shape, generator=g, device=device, dtype=h.dtype)
            labels = label_positions(loss_mask, valid, cfg.window, offset)
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))  # linear warm-up, then constant
            for group in opt.param_groups:
                group["lr"] = lr
            with amp:
                outs = model(emb, noisy, cfg.window, offset, steps)
                loss, ce, vl = draft_loss(target.output, outs, logits, h, labels, cfg.window, cfg.stage,
                                          cfg.vloss_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, batch, tokens = step + 1, batch + 1, tokens + int(valid.sum()) * world
            if bar:
                bar.update(1)
            if master and (step % cfg.log_interval == 0 or step == total):
                dt = time.time() - t0
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
                say(f"step {step:6d} | epoch {epoch:2d} | loss {loss.item():.4f} | ce {ce:.4f} | vloss {vl:.4f} | "
                    f"lr {lr:.2e} | {tokens / dt:7.0f} tok/s | peak mem {mem:.2f} GiB")
                append_csv(os.path.join(cfg.out, "train.csv"), {"step": step, "epoch": epoch,
                                                                  "loss": loss.item(), "ce": ce, "vloss": vl, "lr": lr})
                t0, tokens = time.time(), 0
            if step % cfg.eval_interval == 0 or step == total or batch == per_epoch:
                if master:
                    if eval_ex:
                        acc = evaluate(target, draft, eval_ex, cfg, pad_id, device, amp)
                        seen = evaluate(target, draft, seen_ex, cfg, pad_id, device, amp)
                        say(f"eval step {step} | top-1 agreement at draft steps 1..{cfg.window}: held-out "
                            + " ".join(f"{a:.3f}" for a in acc) + " | train " + " ".join(f"{a:.3f}" for a in seen))
                        append_csv(os.path.join(cfg.out, "eval.csv"), {
                            "step": step, "epoch": epoch, "epochs": round(step / per_epoch, 3),
                            **{f"acc{m + 1}": a for m, a in enumerate(acc)},
                            **{f"train_acc{m + 1}": a for m, a in enumerate(seen)}})
                    save_checkpoint(cfg, draft, target, opt, step, epoch, batch)
                    plot(cfg.out)
                    t0, tokens = time.time(), 0  # keep evaluation out of the next tokens/s
                if world > 1:
                    torch.distributed.barrier()
    if bar:
        bar.close()
    if master:
        print(f"done: {step} steps, stage {cfg.stage}, final loss "
              + (f"{loss.item():.4f}" if loss is not None else "n/a") + ", held-out agreement "
              + " ".join(f"{a:.3f}" for a in acc) + f" -> {os.path.join(cfg.out, 'draft.safetensors')}")
    return draft


# -----------------------------------------------------------------------------

def measure_memory(cfg, target, tokenizer, device):
    """Peak memory of one training step (forward + backward) on one batch: stage 1, then stage 2 at s = 1..6.
    The attention keys are 2T (true states + the draft-state buffer) whatever s is, and the draft layer's own
    saved activations grow only by the ~T/k queries of each extra step (plus one out-of-place copy of the (B, Hkv,
    T, D) key/value buffer per step: written out of place so gradients can flow through the draft states).
    What dominates the growth is the loss: each step keeps its LM-head logits and soft-target log-probs, about
    B * T/k * V numbers in bf16 + fp32 + the fp32 target probabilities, for backward. Measured on an H200 with a
    SmolLM2-shaped target (V = 49152, batch 16 x 1296 tokens, k = 6): peak 2.0, 3.3, 4.7, 6.0, 7.4, 8.7 GiB at
    s = 1..6 (+1.3 GiB a step: ~8 bytes per trained position and vocabulary entry), against 11.3 GiB for
    stage 1, whose loss covers all T positions at once. A self-attention training-time-test draft (EAGLE-3 /
    HASS) would in addition attend over T * s keys at step s."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    window = max(cfg.window, 6)
    examples = data.tokenize_all(tokenizer, data.load_conversations(cfg.data), cfg.max_len)
    ids, loss_mask, valid = (x.to(device) for x in next(data.batches(examples, cfg.batch_size, True, cfg.seed)))
    target.requires_grad_(False).eval()
    draft = Beagle(DraftArgs.from_target(target.args)).to(device)
    model = DraftStep(draft)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    with torch.no_grad():
        logits, h = target(ids)
        emb = target.tok_embeddings(ids)
    labels = label_positions(loss_mask, valid, window, 0)
    B, T = ids.shape
    print(f"batch {B} x {T} tokens, window {window}; attention keys per query: 2T = {2 * T} in stage 2")
    if not cuda:
        print("peak memory is measured on cuda only (torch has no allocator statistics on cpu)")
        return
    mib = lambda x: f"{x / 2**20:8.1f} MiB"
    for s in [0] + list(range(1, 7)):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with amp:
            outs = model(emb, h, window, 0, s)
            layer = torch.cuda.memory_allocated(device) - base  # what the draft layer keeps for backward
            loss, _, _ = draft_loss(target.output, outs, logits, h, labels, window, 1 if s == 0 else 2,
                                    cfg.vloss_weight)
        kept = torch.cuda.memory_allocated(device) - base  # ... plus what the loss keeps
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - base
        draft.zero_grad(set_to_none=True)
        del outs, loss
        print(f"{'stage 1 (all queries)' if s == 0 else f'stage 2, s = {s}':>22}: kept for backward: draft "
              f"{mib(layer)}, draft + loss {mib(kept)}; peak {mib(peak)}")


def main(cfg):
    check_config(cfg)  # before the (possibly slow) target load
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    if world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper trains in TF32 / mixed precision
    target, tokenizer = load_target(cfg.target, device=device, dtype=dtype)
    try:
        if cfg.measure_memory:
            measure_memory(cfg, target, tokenizer, device)
        else:
            train(cfg, target, tokenizer, device, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main(cli(TrainConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
