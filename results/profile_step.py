"""
Where a decoding step's GPU time goes: the plain step and the greedy tree iteration run eagerly under the
profiler, kernels grouped by name (count and time per call), at the same prefix as results/step_time.py.

    python results/profile_step.py --device cuda
"""
import collections
import dataclasses
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import decode  # noqa: E402
import step_time  # noqa: E402


def breakdown(fn, label, top, calls=5):
    fn(), fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    time, count = collections.Counter(), collections.Counter()
    for e in kernels:
        time[e.name[:100]] += e.device_time / calls
        count[e.name[:100]] += 1 / calls
    print(f"== {label}: {len(kernels) / calls:.0f} kernels, {sum(time.values()) / 1000:.3f} ms of kernel time a call")
    for name, t in time.most_common(top):
        print(f"  {t:8.1f} us  x{count[name]:5.0f}  {name}")


@torch.no_grad()
def main(cfg):
    decode.resolve(cfg)
    cfg.cuda_graph = False
    target, tokenizer, draft = decode.load(cfg)
    prompt = tokenizer.chat([{"role": "user", "content": "Explain how a refrigerator works, step by step. " * 8}])
    n = len(prompt) + cfg.max_new_tokens
    breakdown(step_time.plain_step(target, cfg, n), "plain step", 25)
    spec = dataclasses.replace(cfg, mode="tree")
    _, _, extra, steps = decode.spec_steps(target, draft, spec, len(prompt))
    step, ar = decode.width(steps, n, extra)
    nn_, root = torch.tensor([n], device=cfg.device), torch.tensor([prompt[-1]], device=cfg.device)
    breakdown(lambda: step(ar, nn_, root), f"tree {cfg.depth}/{cfg.top_k}/{cfg.tree_tokens} iteration, width "
              f"{ar.numel()}", 45)


if __name__ == "__main__":
    try:
        main(common.cli(decode.DecodeConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
