"""
Does a draft agree with the target as well on MT-bench as on the self-distilled data it trained on? Top-1 agreement
at draft steps 1..5 (train.evaluate: teacher-forced, each position scored at every draft step) over three sets of
conversations, for each draft given:
  - "mtbench": MT-bench first turns, answered greedily by the target (what decode.py --bench decodes);
  - "own, greedy": the first user turns of a generate.py file, answered greedily by the target (the same answers'
    kind, other questions: isolates the questions);
  - "own, sampled": those conversations as generate.py wrote them (replies sampled: what training reads);
  - with --by-category, "mtbench" again one MT-bench category at a time (10 first turns each): where a draft
    falls behind.

    python generate.py --out data/gap.jsonl --conversations 80 --batch-size 40 --seed 3 --max-reply-tokens 256 \
        --device cpu
    python results/agreement_gap.py --own data/gap.jsonl --drafts "drafts/smollm2-135m-instruct.safetensors OLD"
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beagle  # noqa: E402
import bench  # noqa: E402
import common  # noqa: E402
import convert  # noqa: E402
import data  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402


@dataclass
class GapConfig:
    drafts: str = "drafts/smollm2-135m-instruct.safetensors"  # draft checkpoints, spaced
    own: str = "data/gap.jsonl"  # a generate.py file (questions the target wrote; no training run may have read it)
    questions: int = 80  # MT-bench first turns (of 80) and own conversations used, >= 1
    max_new_tokens: int = 256  # of each greedy answer, as decode.py --bench
    batch_size: int = 8  # conversations per evaluation batch
    by_category: bool = False  # also score MT-bench one category at a time
    device: str = "cpu"
    dtype: str = "float32"


def greedy_answers(target, tokenizer, questions, cfg):
    """-> [[user, assistant]] with the target's greedy answer to each question (batched, stop token cut)."""
    prompts = [tokenizer.conversation([q], []) for q in questions]
    out = generate.generate(target, prompts, cfg.max_new_tokens, set(tokenizer.stop_ids), temperature=0.0,
                            batch=min(len(prompts), 40))
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": tokenizer.decode(ids)}]
            for q, (ids, _) in zip(questions, out)]


@torch.no_grad()
def main(cfg):
    device, dtype = common.device_and_dtype(cfg.device, cfg.dtype)
    device = torch.device(device)
    target, tokenizer = convert.load_target(None, device, dtype)
    target.eval()
    mtb, categories = zip(*[(turns[0], c) for turns, c in common.read_prompt_file(bench.mtbench_path())])
    mtb, categories = mtb[:cfg.questions], categories[:cfg.questions]
    own = data.load_conversations(cfg.own)[:cfg.questions]
    firsts = [next(m["content"] for m in c if m["role"] == "user") for c in own]
    sets = {"mtbench": greedy_answers(target, tokenizer, mtb, cfg),
            "own, greedy": greedy_answers(target, tokenizer, firsts, cfg),
            "own, sampled": own}
    examples = {name: [data.tokenize(tokenizer, c, 2048) for c in convs] for name, convs in sets.items()}
    for category in dict.fromkeys(categories) if cfg.by_category else ():
        examples[f"mtbench: {category}"] = [e for e, c in zip(examples["mtbench"], categories) if c == category]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    ecfg = train.TrainConfig(window=5, batch_size=cfg.batch_size, eval_max_batches=10 ** 6)
    sizes = [f"{name}: {len(ex)} conversations, {sum(sum(m) for _, m in ex)} scored tokens"
             for name, ex in examples.items()]
    print(f"agreement_gap | {bench.hardware(device)} | {str(dtype).removeprefix('torch.')} | " + ", ".join(sizes))
    print("| draft | set | steps 1..5 | chain tau |\n|---|---|---|---|")
    for path in cfg.drafts.split():
        draft = beagle.load_draft(path, target, device, dtype).eval()
        # EAGLE-2 drafts next-token only (window 1); scored through 5-token windows its agreement is meaningless
        ecfg.window = 1 if isinstance(draft, beagle.Eagle2) else 5
        for name, ex in examples.items():
            acc = train.evaluate(target, draft, ex, ecfg, pad, device, nullcontext())
            print(f"| {path} | {name} | {' '.join(f'{a:.3f}' for a in acc)} | {train.chain_tau(acc):.2f} |", flush=True)


if __name__ == "__main__":
    try:
        main(common.cli(GapConfig))
    except common.BeagleError as e:
        sys.exit(f"error: {e}")
