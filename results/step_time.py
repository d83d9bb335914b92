"""
Time one decoding step on a GPU, apart from everything around it: the plain step (one token) and the greedy tree
iteration (draft + verification + acceptance + commit), each replayed many times from its CUDA graph, plus the
number of GPU kernels one eager plain forward launches.

    python results/step_time.py                      # the default target and draft, bf16, graphed steps
    python results/step_time.py --compile true       # the same steps compiled by torch.compile before capture

The prefix is 200 tokens of a real prompt; every replay repeats the same step at the same position (the caches
are rewritten in place), which is what a decode step costs whatever the position, up to the attention over the
live slots (every step attends over the whole cache anyway).
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


def kernels_per_forward(target, cfg, n):
    from torch.profiler import ProfilerActivity, profile
    eager = dataclasses.replace(cfg, cuda_graph=False, compile=False)
    cache, _, step = decode.static_step(target, None, eager, n)
    tok, pos = torch.tensor([1], device=cfg.device), torch.tensor([n], device=cfg.device)
    step(tok, pos)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(tok, pos)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


@torch.no_grad()
def main(cfg):
    decode.resolve(cfg)
    target, tokenizer, draft = decode.load(cfg)
    prompt = tokenizer.chat([{"role": "user", "content": "Explain how a refrigerator works, step by step. " * 8}])
    n = len(prompt)
    cache, _, plain = decode.static_step(target, None, cfg, n)
    tok, pos = torch.tensor([prompt[-1]], device=cfg.device), torch.tensor([n], device=cfg.device)
    reps = 200 if torch.cuda.is_available() else 5
    plain_ms = replay_ms(lambda: plain(tok, pos), reps)
    spec = dataclasses.replace(cfg, mode="tree")
    _, dcache, it = decode.static_step(target, draft, spec, n)
    nn_, root = torch.tensor([n], device=cfg.device), torch.tensor([prompt[-1]], device=cfg.device)
    tree_ms = replay_ms(lambda: it(nn_, root), reps)
    k = kernels_per_forward(target, cfg, n) if torch.cuda.is_available() else 0
    print(f"step_time | {bench.hardware(cfg.device)} | {cfg.dtype} | compile {cfg.compile} ({cfg.compile_mode}) | "
          f"plain step {plain_ms:.3f} ms | tree {cfg.depth}/{cfg.top_k}/{cfg.tree_tokens} iteration {tree_ms:.3f} ms "
          f"= {tree_ms / plain_ms:.2f} plain steps | {k} kernels per eager plain forward")


if __name__ == "__main__":
    try:
        main(common.cli(decode.DecodeConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
