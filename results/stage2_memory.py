"""
Peak GPU memory and time of one training step (forward + backward) on one batch of real conversations: stage 1,
then stage 2 at s = 1..6 simulation steps, the draft fresh (its weights do not change what a step keeps); on a CPU
the time only. Takes train.py's options (the data, --batch-size / --batch-tokens, --window, --recompute,
--loss-chunk, --target).

    python results/stage2_memory.py --data data/probe.jsonl --batch-size 32 --device cuda [--recompute false]
"""
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402
from beagle import Beagle, DraftArgs  # noqa: E402
from common import BeagleError, cli, device_and_dtype  # noqa: E402
from convert import load_target  # noqa: E402


def measure_memory(cfg, target, tokenizer, device):
    """Peak memory of one training step (forward + backward) on one batch: stage 1, then stage 2 at s = 1..6.
    Step m's keys are the T true states plus the ~T/k own states of each earlier step. With --recompute a step
    keeps only its inputs, of which only its own (B, Hkv, ~T/k, D) keys and values are new; without it, also the
    draft layer's activations. The loss keeps no logits: SoftCrossEntropy holds a (rows, V) block for
    `--loss-chunk` rows at a time and keeps only an (N, dim) gradient, so the peak should stay nearly flat in s. A self-attention training-time-test
    draft (EAGLE-3 / HASS) would in addition attend over T * s keys at step s."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    window = max(cfg.window, 6)
    examples = data.tokenize_all(tokenizer, data.load_conversations(cfg.data), cfg.max_len)
    ids, loss_mask, valid = next(data.batches(examples, cfg.batch_size, True, cfg.seed, batch_tokens=cfg.batch_tokens))
    target.requires_grad_(False).eval()
    draft = Beagle(DraftArgs.from_target(target.args)).to(device)
    model = train.DraftStep(draft, cfg.recompute)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    with torch.no_grad():
        ids_d = ids.to(device)
        _, h = target(ids_d, last_only=True)
        emb = target.tok_embeddings(ids_d)
    B, T = ids.shape
    print(f"batch {B} x {T} tokens, window {window}; stage 2 step m attends over T + the earlier steps' own states")
    mib = lambda x: f"{x / 2**20:8.1f} MiB"
    sync = torch.cuda.synchronize if cuda else (lambda device: None)
    allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else (lambda: 0)  # (no statistics on a CPU)
    for s in [0] + list(range(1, 7)):
        plan = train.loss_plan(loss_mask, valid, window, 0, s, device)
        times = []
        for _ in range(3):  # the time of the fastest of three steps (the memory of the last)
            sync(device)
            base = allocated()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            with amp:
                outs = model(emb, h, window, 0, s, [q for q, _, _, _ in plan] if s else None)
                layer = allocated() - base  # what the draft layer keeps for backward
                loss, _, _ = train.draft_loss(target.output, outs, h, plan, cfg.vloss_weight, cfg.loss_chunk)
            kept = allocated() - base  # ... plus what the loss keeps
            loss.backward()
            sync(device)
            times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated(device) - base if cuda else 0
            draft.zero_grad(set_to_none=True)
            del outs, loss
        memory = (f"kept for backward: draft {mib(layer)}, draft + loss {mib(kept)}; peak {mib(peak)}; " if cuda
                  else "")
        print(f"{'stage 1 (all queries)' if s == 0 else f'stage 2, s = {s}':>22}: {memory}"
              f"forward + backward {min(times) * 1000:.0f} ms", flush=True)


def main(cfg):
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    target, tokenizer = load_target(cfg.target, device=device, dtype=dtype)
    measure_memory(cfg, target, tokenizer, device)


if __name__ == "__main__":
    try:
        main(cli(train.TrainConfig))
    except BeagleError as e:
        sys.exit(f"error: {e}")
