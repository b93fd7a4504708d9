"""Measurement (a script, not a test): how much of what the reward model knows PPO passes on. On the
validation questions of a finished run, the reward model's score of

  - best-of-n of the SFT policy (n = 1, 2, 4, 8, 16 answers sampled at the run's temperature, the
    reward model's pick), whose KL to the SFT policy is at most log n - (n - 1) / n nats (Stiennon
    et al. 2020, appendix; Gao et al. 2023, scaling laws for reward-model overoptimisation);
  - the PPO policy's sampled answers, with their KL to SFT measured on the same answers;
  - both policies' greedy answers (the answers the results table scores),

printed as a table with the rules judge's score beside each (offline; it reads the references, so
it is an oracle, fine on validation questions), and plotted as score against KL.

    python tests/bench_frontier.py --run-dir runs/tiny [--out docs/frontier.png]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from data.gorilla import prepare  # noqa: E402
from judge import RulesJudge, judge_score  # noqa: E402
from model import GPT, pad_pairs, response_logprobs, sample_answers  # noqa: E402
from reward import load_reward_model  # noqa: E402
from runs import RUN_FILES  # noqa: E402

N_MAX = 16  # answers sampled per question; best-of-n takes the first n


def rm_scores(score_fn, prompts, answers, eot):
    """The reward model's score of each (prompt, answer), in batches of 64."""
    out = []
    for i in range(0, len(prompts), 64):
        pairs = list(zip(prompts[i : i + 64], answers[i : i + 64], strict=True))
        with torch.no_grad():
            out += score_fn(*pad_pairs(pairs, eot)).float().tolist()
    return out


@torch.no_grad()
def kl_to_sft(policy, sft, prompts, answers, eot, temperature):
    """Mean over answers of sum_t log pi(y_t) - log pi_sft(y_t): a Monte-Carlo estimate of
    KL(pi || pi_sft) from answers sampled from pi, both at the sampling temperature."""
    total = 0.0
    for i in range(0, len(prompts), 64):
        batch = pad_pairs(list(zip(prompts[i : i + 64], answers[i : i + 64], strict=True)), eot)
        diff = response_logprobs(policy, *batch, temperature) - response_logprobs(
            sft, *batch, temperature
        )
        total += diff.sum().item()
    return total / len(prompts)


def mean_judge(judge, records, tok, answers):
    return sum(
        judge_score(judge, r, tok.decode(a)) for r, a in zip(records, answers, strict=True)
    ) / len(records)


def best_of_n_rows(sft, score_fn, judge, records, prompts, tok, cfg):
    """(n, KL bound, reward-model score of the pick, judge score of the pick) for n = 1, 2, 4..."""
    many = [p for p in prompts for _ in range(N_MAX)]
    answers = sample_answers(sft, many, tok.eot, cfg.max_answer_tokens, cfg.temperature, cfg.seed)
    scores = rm_scores(score_fn, many, answers, tok.eot)
    rows, n = [], 1
    while n <= N_MAX:
        picks = []
        for q in range(len(prompts)):
            first = range(q * N_MAX, q * N_MAX + n)
            picks.append(max(first, key=lambda j: scores[j]))
        kl = math.log(n) - (n - 1) / n
        rm = sum(scores[j] for j in picks) / len(picks)
        rows.append(
            (
                f"SFT best-of-{n}",
                kl,
                rm,
                mean_judge(judge, records, tok, [answers[j] for j in picks]),
            )
        )
        n *= 2
    return rows


def policy_rows(name, policy, sft, score_fn, judge, records, prompts, tok, cfg):
    """The policy's sampled answers (4 a question: score and KL to SFT) and greedy answers."""
    many = [p for p in prompts for _ in range(4)]
    sampled = sample_answers(
        policy, many, tok.eot, cfg.max_answer_tokens, cfg.temperature, cfg.seed
    )
    kl = kl_to_sft(policy, sft, many, sampled, tok.eot, cfg.temperature)
    rm = sum(rm_scores(score_fn, many, sampled, tok.eot)) / len(many)
    judged = mean_judge(judge, [r for r in records for _ in range(4)], tok, sampled)
    greedy = sample_answers(policy, prompts, tok.eot, cfg.max_answer_tokens, 0.0, cfg.seed)
    greedy_rm = sum(rm_scores(score_fn, prompts, greedy, tok.eot)) / len(prompts)
    return [
        (f"{name} sampled", kl, rm, judged),
        (f"{name} greedy", None, greedy_rm, mean_judge(judge, records, tok, greedy)),
    ]


def plot(rows, trajectory, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bon = [r for r in rows if r[0].startswith("SFT best-of")]
    ax.plot([r[1] for r in bon], [r[2] for r in bon], "o-", label="SFT best-of-n (KL bound)")
    for name, kl, rm, _ in rows:
        if kl is not None and not name.startswith("SFT best-of"):
            ax.plot([kl], [rm], "s", label=name)
    if trajectory:
        ax.plot(
            *zip(*trajectory, strict=True), ".", alpha=0.4, label="PPO rollouts (training prompts)"
        )
    ax.set_xlabel("KL to the SFT policy (nats)")
    ax.set_ylabel("reward-model score (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run-dir", default="runs/tiny", help="a finished run (sft, reward, ppo done)")
    p.add_argument("--out", help="also plot score against KL into this PNG (needs matplotlib)")
    args = p.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(run)
    tok = prepare.tokenizer(cfg.compact)
    records = prepare.run_splits(cfg)["val"]
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in records]
    sft = GPT.from_pretrained(run / RUN_FILES["sft_model"]).eval()
    ppo = GPT.from_pretrained(run / RUN_FILES["ppo_model"]).eval()
    _, score_fn = load_reward_model(run / RUN_FILES["reward_model"], tok, "cpu")
    judge = RulesJudge()
    rows = best_of_n_rows(sft, score_fn, judge, records, prompts, tok, cfg)
    rows += policy_rows("SFT", sft, sft, score_fn, judge, records, prompts, tok, cfg)[1:]
    rows += policy_rows("PPO", ppo, sft, score_fn, judge, records, prompts, tok, cfg)
    print(f"{run}: {len(records)} validation questions, temperature {cfg.temperature}")
    print("| policy | KL to SFT (nats) | reward-model score | judge score |\n|---|---|---|---|")
    for name, kl, rm, judged in rows:
        print(f"| {name} | {'-' if kl is None else f'{kl:.2f}'} | {rm:+.3f} | {judged:.3f} |")
    metrics = [json.loads(line) for line in open(run / "ppo" / "metrics.jsonl")]
    trajectory = [
        (m["objective/kl"], m["objective/scores"]) for m in metrics if m.get("phase") == "ppo"
    ]
    if args.out:
        plot(rows, trajectory, args.out)
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
