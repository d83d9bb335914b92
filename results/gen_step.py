"""
Where the data generator's time goes on a GPU: one step of generate.py's batched engine (the default 2,048 rows, the
cache of the default generator: 768 slots), replayed from its CUDA graph at each attention width, then one eager
step at the widest width under the profiler (GPU time by kernel).

    python results/gen_step.py --device cuda
    python results/gen_step.py --device cuda --batch-size 512

A row's step reads its row of the cache up to the width (2 x 3 heads x 64 values x 30 layers a slot), so the
step's cost is expected to grow with the width where attention dominates, and to stay flat where the weights
and launches do.
"""
import os
import sys
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import convert  # noqa: E402
import generate  # noqa: E402
from step_time import replay_ms  # noqa: E402


@dataclass
class Config:
    batch_size: int = 2048  # engine rows
    cache_len: int = 768  # engine slots (generate.py's default: one turn of 128 user + 512 reply tokens and the header)
    temperature: float = 0.7  # the replies' sampling temperature
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16


@torch.no_grad()
def main(cfg):
    device, dtype = common.device_and_dtype(cfg.device, cfg.dtype)
    device = torch.device(device)
    target, _ = convert.load_target(None, device, dtype)
    B = cfg.batch_size
    shape = generate._shape(target, B, cfg.cache_len, cfg.temperature, 1.0, 0, None)
    bufs, steps = generate._engine(target, *shape)
    bufs["base"].zero_()
    bufs["start"].zero_()
    bytes_per_slot = 2 * target.args.n_kv_heads * target.args.head_dim * target.args.n_layers * dtype.itemsize
    for W, (step, ar) in steps.items():
        pos = torch.full_like(bufs["base"], W - 2)
        ms = replay_ms(lambda: step(pos, ar), 50 if device.type == "cuda" else 2)
        gbs = B * W * bytes_per_slot / ms / 1e6
        print(f"gen_step | B {B} | width {W:4d} | {ms:7.3f} ms | {B / ms * 1000:9.0f} rows/s | K/V read {gbs:6.0f} "
              "GB/s", flush=True)
    if device.type != "cuda":
        return
    W = max(steps)
    bufs2, eager = generate._engine(target, *shape[:3], False)
    pos = torch.full_like(bufs2["base"], W - 2)
    eager[W][0](pos, eager[W][1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eager[W][0](pos, eager[W][1])
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages())
    print(f"eager step at width {W}: {total / 1000:.3f} ms of kernels")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / 1000:8.3f} ms  n {e.count:4d}  {e.key[:90]}")


if __name__ == "__main__":
    try:
        main(common.cli(Config))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
