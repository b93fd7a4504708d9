"""Benchmark one PPO iteration on the tiny preset (prints numbers; asserts nothing).

    python tests/bench_ppo.py

Splits one iteration of ppo.train_ppo into rollout generation, the four teacher-forced passes
(policy, reference and value model, and the reward model's score) and update, then times the
unavoidable work alone (the same generate() call, four bare forward passes, and epochs x minibatches
of bare forward+backward of policy and value) and prints the ratio: the overhead of PPO's own
bookkeeping.
"""

import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, ScalarModel, generate, left_pad, preset_config  # noqa: E402
from ppo import PPOConfig, train_ppo  # noqa: E402


def main():
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=11184)
    policy, ref, value, rm = (
        GPT(config),
        GPT(config),
        ScalarModel(GPT(config)),
        ScalarModel(GPT(config)),
    )
    ref.load_state_dict(policy.state_dict())
    cfg = PPOConfig(
        iterations=2, batch_size=32, minibatch_size=8, epochs=2, missing_eos_penalty=0.0
    )
    sampling = SimpleNamespace(
        seed=1, temperature=1.0, max_answer_tokens=96, grad_clip=1.0, device="cpu"
    )
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, 11000, (int(n),), generator=g).tolist()
        for n in torch.randint(30, 70, (64,), generator=g)
    ]
    # A random model samples this id with probability ~1/vocab per step, so nearly every answer has
    # max_new_tokens tokens and both timings below do the same work.
    eot = config.vocab_size - 1
    tok = SimpleNamespace(eot=eot, decode=str)
    with tempfile.TemporaryDirectory() as d:
        history = train_ppo(policy, ref, value, rm.score, prompts, tok, cfg, sampling, d)
    h = history[-1]
    forward = h["time/logprobs_values_score"]  # the policy, reference, value and reward passes
    total = h["time/generate"] + forward + h["time/update"]
    print(
        f"PPO iteration (tiny preset, batch {cfg.batch_size}, {sampling.max_answer_tokens} new "
        f"tokens, {cfg.epochs} epochs): generate {h['time/generate']:.2f}s, logprobs/values/score "
        f"{forward:.2f}s, update {h['time/update']:.2f}s, total {total:.2f}s"
    )

    # the unavoidable work, bare
    query, query_mask = left_pad(prompts[: cfg.batch_size], 0)
    t0 = time.time()
    with torch.no_grad():
        response, response_mask, _ = generate(
            policy, query, query_mask, sampling.max_answer_tokens, eot, sampling.temperature
        )
    t_gen = time.time() - t0
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    t0 = time.time()
    with torch.no_grad():
        policy(ids, mask), ref(ids, mask), value(ids, mask), rm(ids, mask)
    t_fwd = time.time() - t0
    t0 = time.time()
    for _ in range(cfg.epochs):
        for i in range(0, cfg.batch_size, cfg.minibatch_size):
            (
                policy(ids[i : i + cfg.minibatch_size], mask[i : i + cfg.minibatch_size])
                .float()
                .mean()
                + value(ids[i : i + cfg.minibatch_size], mask[i : i + cfg.minibatch_size]).mean()
            ).backward()
    t_bwd = time.time() - t0
    bare = t_gen + t_fwd + t_bwd
    print(
        f"bare work: generate {t_gen:.2f}s, 4 forward passes {t_fwd:.2f}s, "
        f"forward+backward {t_bwd:.2f}s, total {bare:.2f}s"
    )
    print(
        json.dumps(dict(ratio=round(total / bare, 3)))
        + "   <- iteration / unavoidable work (goal <= 1.3)"
    )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    main()
