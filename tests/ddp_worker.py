"""One process of the multi-process checks in tests/test_distributed.py, run alone (one process) or
under `torchrun --standalone --nproc_per_node 2` (gloo on the CPU):

    python tests/ddp_worker.py steps OUT_DIR  # k SFT steps, one reward-model step, one PPO update
    python tests/ddp_worker.py dead OUT_DIR   # (2 ranks, launched by hand) rank 1 dies, no barrier

`steps` saves OUT_DIR/rank<r>.pt: the parameters after each check and this rank's rows of the
whitened advantages, for the test to compare one process against two."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ppo  # noqa: E402
import rlaif  # noqa: E402
import sft  # noqa: E402
from distributed import DIST, average_gradients, barrier, setup_distributed, shard  # noqa: E402
from model import GPT, GPTConfig, ScalarModel  # noqa: E402
from reward import comparisons_loss  # noqa: E402
from training import make_optimizer  # noqa: E402

SMALL = GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
EOT = 63


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def sft_steps(out):
    """3 steps of sft.train_sft with a global batch of 8 (each of 2 ranks: 4), accumulation 2."""
    cfg = rlaif.make_config(
        init="micro",
        sft_steps=3,
        sft_batch_size=8,
        sft_grad_accum=2,
        sft_eval_every=100,
        sft_lr=1e-3,
        sft_warmup=1,
    )
    tok = SimpleNamespace(vocab_size=64, eot=EOT)
    g = torch.Generator().manual_seed(0)
    examples = [
        (
            torch.randint(1, 60, (3 + i % 3,), generator=g).tolist(),
            torch.randint(1, 60, (2 + i % 4,), generator=g).tolist() + [EOT],
        )
        for i in range(32)
    ]
    model, _ = sft.train_sft(tok, examples, examples[:4], cfg.sft, cfg, out / f"sft_{DIST.world}")
    return params(model), validation(model, examples[:7])


def validation(model, examples):
    """sft.validation_loss on 7 examples, and how many of them this rank scored."""
    seen, pad_pairs = [], sft.pad_pairs
    sft.pad_pairs = lambda chunk, *a: seen.extend(chunk) or pad_pairs(chunk, *a)
    try:
        return dict(loss=sft.validation_loss(model, examples, EOT, "cpu"), scored=len(seen))
    finally:
        sft.pad_pairs = pad_pairs


def reward_model_step():
    torch.manual_seed(0)
    rm = ScalarModel(GPT(SMALL), n_aux=6)
    g = torch.Generator().manual_seed(1)
    samples = {
        i: SimpleNamespace(
            query=[1, 2, 3 + i % 2],
            response=torch.randint(5, 60, (3 + i % 5,), generator=g).tolist() + [EOT],
        )
        for i in range(12)
    }
    # Each rank's pairs share no answer with the other's: the auxiliary loss is a mean over the
    # distinct answers each rank sees, so an answer in pairs on two ranks would count twice
    # (documented).
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (0, 4), (2, 6)]
    targets = {i: torch.rand(6, generator=g).tolist() for i in samples}
    # Adam's first step, lr * g / |g|, would magnify rounding
    optimizer = torch.optim.SGD(rm.parameters(), lr=0.1)
    loss = comparisons_loss(
        rm, samples, shard(pairs), SimpleNamespace(eot=EOT), "cpu", targets, aux_weight=1.0
    )
    loss.backward()
    average_gradients(rm.parameters())
    torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
    optimizer.step()
    return params(rm)


def ppo_update():
    """One update on a fixed rollout batch of 8 answers (2 per prompt), advantages whitened over the
    batch."""
    torch.manual_seed(0)
    policy, ref, value = GPT(SMALL), GPT(SMALL), ScalarModel(GPT(SMALL))
    ref.load_state_dict(policy.state_dict())
    prompts = [[1, 2, 3 + i] for i in range(4) for _ in range(2)]
    score_fn = lambda q, qm, r, rm: (r == 7).float().sum(1)  # noqa: E731
    sampling = SimpleNamespace(device="cpu", temperature=1.0, max_answer_tokens=8, grad_clip=1.0)
    batch = ppo.rollout(
        policy, ref, value, score_fn, prompts, sampling, EOT, torch.Generator().manual_seed(3)
    )
    # this rank's prompt groups
    rows = torch.tensor(shard([[2 * g, 2 * g + 1] for g in range(4)])).flatten()
    batch = {k: v[rows] if torch.is_tensor(v) else v for k, v in batch.items()}
    cfg = ppo.PPOConfig(
        batch_size=8,
        rollouts_per_prompt=2,
        minibatch_size=8,
        epochs=1,
        whiten_advantages=True,
        lr=1e-3,
        vf_lr=1e-3,
    )
    ppo.check_config(cfg)
    global_batch = ppo.gather_batch(batch)  # every rank's answers, as train_ppo
    _, _, advantages, returns, _ = ppo.advantages_and_returns(global_batch, cfg, kl_coef=0.05)
    advantages, returns = ppo.own_rows(advantages, batch), ppo.own_rows(returns, batch)
    batch.update(advantages=advantages, returns=returns)
    optimizers = [make_optimizer(policy, cfg.lr, 0.0), make_optimizer(value, cfg.vf_lr, 0.0)]
    generator = torch.Generator().manual_seed(0)
    ppo.ppo_update(policy, value, optimizers, batch, cfg, sampling, generator, 0.05, True)
    return params(policy), params(value), rows, advantages


def main(mode, out):
    out = Path(out)
    setup_distributed("cpu", timeout=60)
    if mode == "dead":
        if DIST.rank == 1:
            raise RuntimeError("rank 1 died before the barrier")
        barrier(timeout=5)
        return
    sft, val = sft_steps(out)
    rm = reward_model_step()
    policy, value, rows, advantages = ppo_update()
    torch.save(
        dict(sft=sft, val=val, rm=rm, policy=policy, value=value, rows=rows, advantages=advantages),
        out / f"rank{DIST.rank}_of_{DIST.world}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
