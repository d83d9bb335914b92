"""
Where an answer's time goes on a GPU: six MT-bench first turns answered plainly and speculatively after the
benchmark's warm-up, each timed as the benchmark times it (ms per token and per target forward), then one answer of
each kind under the profiler (the host's CPU time by operation: graph launches, the waits of each read-back).

    python results/answer_time.py --device cuda
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import decode  # noqa: E402


@torch.no_grad()
def main(cfg):
    decode.resolve(cfg)
    target, tokenizer, draft = decode.load(cfg)
    convs = common.read_prompt_file(data.mtbench_file())[::10][:6]
    stop = set(tokenizer.stop_ids)
    prompts = [tokenizer.conversation(turns[:1], [], cfg.system) for turns, _ in convs]
    bench.warm_up(target, draft, prompts[0], cfg, ("ar", "tree"))
    for mode in ("ar", "tree"):
        for p in prompts:
            r = decode.run(target, draft, p, cfg, stop, mode=mode)
            print(f"{mode} prompt {len(p)}: {len(r.tokens)} tokens {r.seconds * 1000:.1f} ms = "
                  f"{r.seconds * 1000 / len(r.tokens):.3f} ms/token, {r.seconds * 1000 / r.target_forwards:.3f} "
                  f"ms/forward, tau {r.tau:.2f}")
    for mode in ("ar", "tree"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = decode.run(target, draft, prompts[1], cfg, stop, mode=mode)
        print(f"== {mode}: wall {r.seconds * 1000:.1f} ms for {r.target_forwards} forwards")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
            print(f"  cpu self {e.self_cpu_time_total / 1000:8.2f} ms  n {e.count:6d}  {e.key[:80]}")


if __name__ == "__main__":
    try:
        main(common.cli(decode.DecodeConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
