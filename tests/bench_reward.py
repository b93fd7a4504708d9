"""What the reward model of a run ranks right, beside what its starting network already ranks.

    python tests/bench_reward.py runs/s1 [runs/s2 ...]

On the held-out prompts' judge-ordered pairs of the policy's own answers (the split of
reward.train_reward_model, ties excluded), the pairwise accuracy of:
  - the SFT model's mean token log-prob of the whole answer, and of the api_call line alone
    (untrained read-outs of the network the reward model starts from);
  - the run's reward model (run_dir/reward/model.pt), overall and by the judge question that
    separates the pair and by the pair's judge-score margin;
and best-of-n on those prompts: the mean judge score of the answer each scorer picks, against the
judge's own pick and a random one. The reward model's curve (measured every eval_every steps) is in
run_dir/reward/metrics.jsonl; this prints it too.
"""

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from data.gorilla import prepare  # noqa: E402
from judge import Feedback  # noqa: E402
from model import GPT, pad_pairs, response_logprobs  # noqa: E402
from reward import (  # noqa: E402
    APIDatabase,
    RMConfig,
    pair_accuracy,
    policy_pairs,
    read_reward_model,
    reading_reports,
    rm_scores,
    split_prompts,
)
from runs import RUN_FILES, Sample, read_rows  # noqa: E402


def line_mask(tok, response, tag="<<<api_call>>>"):
    """1 for the response tokens whose text lies on the section `tag` begins, up to the next tag."""
    text = ""
    starts = []
    for t in response:
        starts.append(len(text))
        text += tok.decode([t])
    a = text.find(tag)
    b = text.find("<<<", a + len(tag)) if a >= 0 else -1
    b = len(text) if b < 0 else b
    return [float(a >= 0 and a <= s < b) for s in starts]


@torch.no_grad()
def logprob_readouts(sft, samples, ids, tok):
    """{id: mean log-prob of the answer}, {id: mean log-prob of its api_call
    line} under the SFT model."""
    whole = {}
    api = {}
    for i in range(0, len(ids), 32):
        chunk = ids[i : i + 32]
        q, qm, r, rm = pad_pairs([(samples[j].query, samples[j].response) for j in chunk], tok.eot)
        lp = response_logprobs(sft, q, qm, r, rm)
        for k, j in enumerate(chunk):
            n = int(rm[k].sum())
            m = torch.tensor(line_mask(tok, samples[j].response[:n]))
            whole[j] = lp[k, :n].mean().item()
            api[j] = ((lp[k, :n] * m).sum() / m.sum().clamp(min=1)).item()
    return whole, api


def best_of_n(scores, fb):
    """Mean judge score of the answer `scores` picks per prompt (the first on ties)."""
    by_prompt = {}
    for f in fb:
        by_prompt.setdefault(f.record, []).append(f)
    return sum(max(g, key=lambda f: scores[f.id]).score for g in by_prompt.values()) / len(
        by_prompt
    )


def bench(run):
    cfg = load_config(run, rm=RMConfig)
    tok = prepare.tokenizer(cfg.compact)
    samples = {s.id: s for s in read_rows(run / RUN_FILES["samples"], Sample)}
    feedback = read_rows(run / RUN_FILES["feedback"], Feedback)
    by_id = {f.id: f for f in feedback}
    heldout, _, rng = split_prompts(feedback, cfg.rm, cfg.seed)
    fb, pairs = policy_pairs(feedback, heldout, rng)
    ids = [f.id for f in fb]
    sft = GPT.from_pretrained(run / RUN_FILES["sft_model"]).eval()
    whole, api = logprob_readouts(sft, samples, ids, tok)
    scorers = {"SFT log-prob, whole answer": whole, "SFT log-prob, api_call line": api}
    if (run / RUN_FILES["reward_model"]).exists():
        rm, ckpt = read_reward_model(run / RUN_FILES["reward_model"])
        read = reading_reports(samples, tok, APIDatabase()) if ckpt.get("tools") else samples
        scorers["reward model"] = dict(
            zip(ids, rm_scores(rm, read, ids, tok, "cpu").tolist(), strict=True)
        )
    scorers["judge"] = {f.id: f.score for f in fb}
    scorers["random"] = {i: random.Random(i).random() for i in ids}
    print(f"\n## {run}: {len(pairs)} held-out pairs of {len(heldout)} prompts")
    for name, scores in scorers.items():
        acc = pair_accuracy(scores, by_id, pairs, "")
        detail = ", ".join(
            f"{k[1:]} {v:.2f}" for k, v in acc.items() if "/question/" in k or "/margin/" in k
        )
        print(
            f"- {name}: accuracy {acc['/accuracy']:.3f}, best-of-n judge score "
            f"{best_of_n(scores, fb):.3f}"
            f"  ({detail})"
        )
    metrics = run / "reward" / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        curve = [
            (r["step"], r.get("heldout/accuracy"), r.get("val/accuracy"), r.get("train/accuracy"))
            for r in rows
            if "heldout/pairs" in r
        ]
        print(
            "- curve (step, held-out, validation, training pairs):",
            " ".join(
                f"({s}, {h:.3f}, {v:.3f}, {t:.3f})" for s, h, v, t in curve if None not in (h, v, t)
            ),
        )
    return scorers


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "run_dirs", nargs="*", default=["runs/tiny"], help="runs whose reward stage is done"
    )
    for run_dir in parser.parse_args().run_dirs:
        bench(Path(run_dir))
