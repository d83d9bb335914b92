"""
Grouped-query attention with an explicit mask, four ways, timed on a GPU: each variant over the shapes this project
uses (30 calls in one CUDA graph, the layers of SmolLM2), then results/step_time.py's plain step and tree iteration
with llama.attention replaced by that variant.

    python results/attention_ab.py            # (CUDA only) the default target and draft, bf16, graphed steps

tiled:  the g query heads of a kv head as g x T query rows of that head, the mask tiled (no K/V copy)
manual: tiled, as two matmuls and a softmax instead of SDPA
repeat: K and V repeated for each query head, then SDPA
gqa:    SDPA's own grouped-query attention (enable_gqa=True) with the mask
current: llama.attention as it is
"""
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import decode  # noqa: E402
import llama  # noqa: E402
import step_time  # noqa: E402


def tiled(q, k, v, mask):
    B, H, T, D = q.shape
    rows = mask.repeat(*[1] * (mask.dim() - 2), H // k.shape[1], 1)
    return F.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, D), k, v, attn_mask=rows).reshape(B, H, T, D)


def manual(q, k, v, mask):
    B, H, T, D = q.shape
    rows = mask.repeat(*[1] * (mask.dim() - 2), H // k.shape[1], 1)
    s = q.reshape(B, k.shape[1], -1, D) @ k.transpose(-1, -2) * D ** -0.5 + rows
    return (torch.softmax(s, -1, dtype=torch.float32).to(v.dtype) @ v).reshape(B, H, T, D)


def repeat(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


def gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


VARIANTS = dict(current=llama.attention, tiled=tiled, manual=manual, repeat=repeat, gqa=gqa)


def micro(dtype=torch.bfloat16):
    for B, T, S in [(1, 1, 2048), (1, 6, 2048), (1, 60, 2048), (2048, 1, 768), (32, 330, 330)]:
        q = torch.randn(B, 9, T, 64, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, 3, S, 64, device="cuda", dtype=dtype) for _ in range(2))
        mask = torch.zeros(1, 1, T, S, device="cuda", dtype=dtype)
        mask[..., S // 2:] = float("-inf")
        ref, out = repeat(q, k, v, mask).float(), []
        for name, f in VARIANTS.items():
            err = (f(q, k, v, mask).float() - ref).abs().max().item()
            graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream
                f(q, k, v, mask)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                for _ in range(30):
                    f(q, k, v, mask)
            out.append(f"{name} {step_time.replay_ms(graph.replay, 50) / 30 * 1000:.1f} us (max err {err:.1e})")
        print(f"attention B={B} T={T} S={S}, per call: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("error: results/attention_ab.py times CUDA kernels: it needs a GPU")
    micro()
    cfg = common.cli(decode.DecodeConfig, sys.argv[1:] + ["--device", "cuda"])
    for name, f in VARIANTS.items():
        llama.attention = f
        print(f"{name}: ", end="", flush=True)
        step_time.main(dataclasses.replace(cfg))
