"""
Time one decoding step on a GPU, apart from everything around it: the plain step (one token) and the greedy tree
iteration (draft + verification + acceptance + commit), each replayed many times from its CUDA graph, plus the
number of GPU kernels one eager plain forward launches.

    python results/step_time.py                      # the default target and draft, bf16, decode.py's default steps
    python results/step_time.py --compile false      # graphed only (no torch.compile)
    python results/step_time.py --compile true       # both steps compiled by torch.compile before capture

The prefix is a real prompt (about 100 tokens) plus --max-new-tokens (256) more, the middle of a long answer;
every replay repeats the same step at the same position (the caches are rewritten in place). A step attends over
the live slots rounded up to a multiple of decode.WIDTH, so its cost grows with the prefix by that much.
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import common  # noqa: E402
import decode  # noqa: E402
import generate  # noqa: E402


def replay_ms(fn, reps=200):
    for _ in range(10):
        fn()
    if not torch.cuda.is_available():  # (a CPU run only checks that the script works)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1000 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def plain_step(target, cfg, n):
    """The plain step (generate.py's engine at batch 1, as decode.py uses it) at the width that holds a prefix of n."""
    shape = generate._shape(target, 1, decode.cache_slots(target, cfg), 0.0, 1.0, 0, cfg.cuda_graph)
    bufs, steps = generate._engine(target, *shape, compile=decode.compiled(cfg, "ar"))
    bufs["base"].fill_(n)
    step, ar = steps[-(-(n + 1) // generate.WIDTH_STEP) * generate.WIDTH_STEP]
    pos = torch.tensor([n], device=cfg.device)
    return lambda: step(pos, ar)


def kernels_per_forward(target, cfg, n):
    from torch.profiler import ProfilerActivity, profile
    step = plain_step(target, dataclasses.replace(cfg, cuda_graph=False, compile=False), n)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.no_grad()
def main(cfg):
    decode.resolve(cfg)
    target, tokenizer, draft = decode.load(cfg)
    prompt = tokenizer.chat([{"role": "user", "content": "Explain how a refrigerator works, step by step. " * 8}])
    n = len(prompt) + cfg.max_new_tokens  # a prefix in the middle of a long answer
    reps = 200 if torch.cuda.is_available() else 5
    plain_ms = replay_ms(plain_step(target, cfg, n), reps)
    spec = dataclasses.replace(cfg, mode="tree")
    _, _, extra, steps = decode.spec_steps(target, draft, spec, len(prompt))
    step, ar = decode.width(steps, n, extra)
    nn_, root = torch.tensor([n], device=cfg.device), torch.tensor([prompt[-1]], device=cfg.device)
    tree_ms = replay_ms(lambda: step(ar, nn_, root), reps)
    k = kernels_per_forward(target, cfg, n) if torch.cuda.is_available() else 0
    print(f"step_time | {bench.hardware(cfg.device)} | {cfg.dtype} | compiled: plain "
          f"{decode.compiled(cfg, 'ar')}, tree {decode.compiled(cfg, 'tree')} | "
          f"prefix {n}, width {ar.numel()} of {decode.cache_slots(target, cfg)} slots | plain step {plain_ms:.3f} ms "
          f"| tree {cfg.depth}/{cfg.top_k}/{cfg.tree_tokens} iteration {tree_ms:.3f} ms = {tree_ms / plain_ms:.2f} "
          f"plain steps | {k} kernels per eager plain forward")


if __name__ == "__main__":
    try:
        main(common.cli(decode.DecodeConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
