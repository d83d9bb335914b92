"""
What one training step of a draft keeps for its backward pass, in bytes, counted by autograd itself (every tensor
it saves, by storage): Beagle stage 1, Beagle stage 2 at s = 1..6 (with and without --recompute) and EAGLE-2's
next-token step, on the default target's shapes. The same count on any device: it is what differs between the
drafts (the frozen target, the weights and the optimizer state are the same for both, or nearly).

    python results/train_memory.py                     # batch 32 x 340 tokens, as --measure-memory's probe batch

The token ids are random: what a step keeps depends on the shapes only.
"""
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beagle  # noqa: E402
import train  # noqa: E402
from common import cli  # noqa: E402
from convert import load_target  # noqa: E402


@dataclass
class MemoryConfig:
    batch_size: int = 32
    seq_len: int = 340
    window: int = 5  # Beagle's k (stage 2 runs s <= 6 steps over windows of max(k, 6))


def kept_bytes(target, draft, ids, window, steps, recompute=True):
    """Bytes autograd keeps from the forward of one step (draft layer and loss) until its backward."""
    with torch.no_grad():
        _, h = target(ids, last_only=True)
        emb = target.tok_embeddings(ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    plan = train.loss_plan(valid, valid, window, 0, steps, torch.device("cpu"))
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        queries = [q for q, _, _, _ in plan] if steps else None
        outs = train.DraftStep(draft, recompute)(emb, h, window, 0, steps, queries)
        loss, _, _ = train.draft_loss(target.output, outs, h, plan, 10.0)
    loss.backward()
    draft.zero_grad(set_to_none=True)
    return sum(seen.values())


def main(cfg):
    target, _ = load_target()
    target.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.args.vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    args = beagle.DraftArgs.from_target(target.args)
    mib = lambda b: f"{b / 2**20:7.1f} MiB"
    b, e = beagle.Beagle(args), beagle.Eagle2(args)
    n = lambda d: sum(p.numel() for p in d.parameters())
    print(f"batch {cfg.batch_size} x {cfg.seq_len} tokens; draft parameters: Beagle {n(b) / 1e6:.2f}M, EAGLE-2 "
          f"{n(e) / 1e6:.2f}M")
    print(f"{'EAGLE-2 (next token)':>26}: {mib(kept_bytes(target, e, ids, 1, 0))}")
    print(f"{'Beagle stage 1 (k = ' + str(cfg.window) + ')':>26}: {mib(kept_bytes(target, b, ids, cfg.window, 0))}")
    for s in range(1, 7):
        on, off = (kept_bytes(target, b, ids, max(cfg.window, 6), s, r) for r in (True, False))
        print(f"{f'Beagle stage 2, s = {s}':>26}: {mib(on)} with --recompute, {mib(off)} without")


if __name__ == "__main__":
    main(cli(MemoryConfig))
