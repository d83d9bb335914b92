"""
Tree shapes by measurement: MT-bench first turns answered plainly once and speculatively with each tree shape,
greedy and sampled, in one process (the models loaded once, every shape warmed up before it is timed). Prints one
line per (temperature, shape): tokens/s, tau, and the speedup over plain decoding at that temperature.

    python results/tree_sweep.py --device cuda --bench-limit 16
    python results/tree_sweep.py --device cuda --bench-limit 16 --shapes "5/10/60 4/8/32 3/4/16 6/10/80"
    python results/tree_sweep.py --device cpu --bench-limit 8 --max-new-tokens 128 --shapes "2/2/3 3/2/5 2/4/7"

A shape is depth / top-k / tree tokens (--mode chain: depth / 1 / depth). The plain answers are timed once per
temperature and shared by every shape; each answer is timed as decode.py --bench times it.
"""
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import common  # noqa: E402
import decode  # noqa: E402


@dataclass
class SweepConfig(decode.DecodeConfig):
    shapes: str = "5/10/60 6/10/60 4/10/60 5/8/48 5/10/40 4/8/32 3/6/20 3/4/12"  # depth/top-k/tree tokens, spaced
    temperatures: str = "0 1"  # the sampling temperatures swept, spaced (0: greedy)


def parse_shapes(text):
    try:
        shapes = [tuple(int(x) for x in s.split("/")) for s in text.split()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise common.BeagleError(f"--shapes: depth/top-k/tree-tokens triples of positive integers, got {text!r}")
    return shapes


def timed(target, draft, prompts, cfg, stop, mode):  # -> (tokens/s over all answers, tau)
    results = [decode.run(target, draft, p, cfg, stop, mode=mode) for p in prompts]
    tokens, seconds = sum(len(r.tokens) for r in results), sum(r.seconds for r in results)
    forwards = sum(r.target_forwards for r in results)
    return tokens / seconds, tokens / forwards


@torch.no_grad()
def main(cfg):
    shapes, temps = parse_shapes(cfg.shapes), [float(t) for t in cfg.temperatures.split()]
    cfg.depth, cfg.top_k, cfg.tree_tokens = shapes[0]
    decode.resolve(cfg)
    target, tokenizer, draft = decode.load(cfg)
    if draft is None:
        raise common.BeagleError("the sweep needs a draft (--draft PATH)")
    convs = bench.spread(common.read_prompt_file(bench.mtbench_path()), cfg.bench_limit)
    prompts = [tokenizer.conversation(turns[:1], [], cfg.system) for turns, _ in convs]
    stop = set(tokenizer.stop_ids)
    print(f"tree_sweep | {bench.hardware(cfg.device)} | {cfg.dtype} | {len(prompts)} MT-bench first turns | "
          f"{cfg.max_new_tokens} new tokens | compiled: plain {decode.compiled(cfg, 'ar')}, "
          f"tree {decode.compiled(cfg, 'tree')} | draft vocabulary {cfg.draft_vocab or 'all'}")
    for t in temps:
        base = dataclasses.replace(cfg, temperature=t)
        bench.warm_up(target, draft, prompts[0], base, ("ar",))
        plain, _ = timed(target, draft, prompts, base, stop, "ar")
        print(f"T {t:g} | plain | {plain:8.1f} tok/s", flush=True)
        for depth, top_k, tree_tokens in shapes:
            c = dataclasses.replace(base, depth=depth, top_k=top_k, tree_tokens=tree_tokens)
            bench.warm_up(target, draft, prompts[0], c, (c.mode,))
            speed, tau = timed(target, draft, prompts, c, stop, c.mode)
            print(f"T {t:g} | {c.mode} {depth}/{top_k}/{tree_tokens} | {speed:8.1f} tok/s | tau {tau:.2f} | "
                  f"{speed / plain:.3f}x plain", flush=True)


if __name__ == "__main__":
    try:
        main(common.cli(SweepConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
