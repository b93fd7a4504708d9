"""
DPO, Direct Preference Optimization (Rafailov et al. 2023) [not in the paper]: one of the
comparisons that rlaif.py --compare puts beside the paper's PPO, trained on the same AI
feedback and from the same SFT model.

No reward model and no sampling: the judge-ordered pairs (reward.make_pairs, the pairs the reward
model learns from) train the policy directly, with the frozen SFT model as the reference (eq. 7):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x))
                                - (log pi(y_l|x) - log ref(y_l|x))])

    python dpo.py      # DPO on the feedback of the run in --run-dir (default runs/tiny)
"""

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from config import driver_flag, prepare_out, save_config, stage_settings
from data.gorilla import prepare
from distributed import average_gradients, barrier, global_mean, is_main, shard
from judge import Feedback
from model import GPT, FlopMeter, pad_pairs, response_logprobs
from reward import RMConfig, make_pairs, pair_batches
from runs import (
    RUN_FILES,
    Sample,
    atomic_dir,
    log,
    os_errors_as_messages,
    read_rows,
    require_done,
    resume,
    run_alone,
    run_file,
    run_part,
    save_checkpoint,
    set_aside,
    start_over,
    write_metrics,
)
from training import autocast, check_loss, frozen_dtype, make_optimizer, progress, require_items


@dataclass
class DPOConfig:
    steps: Annotated[int, "optimizer steps (each on batch_size judge-ordered pairs)", ">= 1"] = 100
    batch_size: Annotated[int, "judge-ordered pairs per step", ">= 1"] = 16
    lr: Annotated[float, "AdamW learning rate (constant)", "> 0"] = 1e-5
    beta: Annotated[
        float, "strength of the implicit KL penalty to the SFT model (Rafailov et al. eq. 7)", "> 0"
    ] = 0.1


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """Mean DPO loss of sequence log-probs (B,) each; also the implicit reward margin, for
    logging."""
    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    loss = global_mean(-F.logsigmoid(beta * margin))  # over every rank's pairs
    return loss, global_mean(beta * margin)


def sequence_logprobs(model, samples, ids, tok, device):
    """Sum of each answer's token log-probs, log pi(y|x), at temperature 1
    (the shared response_logprobs)."""
    batch = pad_pairs([(samples[i].query, samples[i].response) for i in ids], tok.eot, device)
    return response_logprobs(model, *batch).sum(1)


def train_dpo(policy, ref_policy, samples, pairs, tok, cfg, run_cfg, out_dir):
    """cfg.steps of DPO (cfg: DPOConfig) on (chosen id, rejected id) pairs of `samples`. run_cfg:
    the run's config.Config, for the settings DPO shares with the other stages (seed, grad_clip,
    device). Checkpoints to out_dir/ckpt.pt every 20 steps and resumes from it."""
    ref_policy.eval().requires_grad_(False)
    optimizer = make_optimizer(policy, cfg.lr, weight_decay=0.0)
    ckpt_file = Path(out_dir) / "ckpt.pt"
    settings = asdict(cfg)
    step, history, _ = resume(
        ckpt_file, run_cfg.device, optimizer, "dpo", log, settings=settings, policy=policy
    )
    epochs = math.ceil(cfg.steps * cfg.batch_size / max(1, len(pairs)))
    order = pair_batches(samples, pairs, cfg.batch_size, epochs, run_cfg.seed)
    steps = min(cfg.steps, len(order))
    t0 = time.time()
    start = step
    meter = FlopMeter()
    while step < steps:
        batch = shard([pairs[i] for i in order[step]])  # this rank's share (all of it, one process)
        logps = pair_logprobs(policy, ref_policy, samples, batch, tok, run_cfg.device)
        loss, margin = dpo_loss(*logps, cfg.beta)
        check_loss(
            loss,
            "dpo",
            f"step {step + 1}",
            f"{driver_flag('dpo', 'lr')} and {driver_flag('dpo', 'beta')}",
        )
        loss.backward()
        average_gradients(policy.parameters())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), run_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(step_metrics(step, loss, margin, logps, cfg))
        if step % 20 == 0 or step == steps:
            log(
                f"[dpo] step {step}/{steps} loss {loss.item():.4f} margin {margin.item():+.3f} "
                f"{meter.line(policy)} {progress(step - start, steps - start, t0)}"
            )
            save_state(out_dir, policy, optimizer, step, history, settings)


def pair_logprobs(policy, ref_policy, samples, batch, tok, device):
    """(log pi(y_w|x), log pi(y_l|x), log ref(y_w|x), log ref(y_l|x)) of a batch of pairs, fp32."""
    chosen = [a for a, _ in batch]
    rejected = [b for _, b in batch]
    policy.train()
    with autocast(device):
        with torch.no_grad():
            ref_c, ref_r = (
                sequence_logprobs(ref_policy, samples, ids, tok, device)
                for ids in (chosen, rejected)
            )
        logp_c, logp_r = (
            sequence_logprobs(policy, samples, ids, tok, device) for ids in (chosen, rejected)
        )
    return logp_c.float(), logp_r.float(), ref_c.float(), ref_r.float()


def step_metrics(step, loss, margin, logps, cfg):
    """A metrics row: the loss, the implicit rewards beta * log(pi / ref) of the chosen and the
    rejected answers (eq. 5), and how often the chosen one's is higher."""
    logp_c, logp_r, ref_c, ref_r = logps
    with torch.no_grad():
        r_c = cfg.beta * (logp_c - ref_c)
        r_r = cfg.beta * (logp_r - ref_r)
    return dict(
        step=step,
        loss=loss.item(),
        chosen_reward=global_mean(r_c).item(),
        rejected_reward=global_mean(r_r).item(),
        margin=margin.item(),
        accuracy=global_mean((r_c > r_r).float()).item(),
        lr=cfg.lr,
    )


def save_state(out_dir, policy, optimizer, step, history, settings):
    """The checkpoint train_dpo resumes from (with the settings it was made with), and
    metrics.jsonl (rank 0 writes both)."""
    if is_main():
        state = dict(policy=policy.state_dict(), optimizer=optimizer.state_dict())
        save_checkpoint(
            Path(out_dir) / "ckpt.pt", **state, settings=settings, step=step, history=history
        )
        write_metrics(Path(out_dir) / "metrics.jsonl", history)


def dpo_stage(cfg, run, splits, out_dir, **files):
    """The DPO policy of a run: from its SFT model, on the judge-ordered pairs of its
    feedback (the reward model's pairs, reward.make_pairs), saved to out_dir/model. A part
    of rlaif.py's compare stage. files: sft_model, samples and feedback in place of the run's
    (python dpo.py --sft-model)."""
    meter = FlopMeter()
    tok = prepare.tokenizer(cfg.compact)
    samples = {s.id: s for s in read_rows(run_file(run, "samples", files), Sample)}
    feedback = read_rows(run_file(run, "feedback", files), Feedback)
    pairs = make_pairs(feedback, cfg.rm.max_contrast_pairs, random.Random(cfg.seed))
    require_items(
        pairs, "dpo", "judge-ordered pairs", "every answer to a prompt got the same score"
    )
    torch.manual_seed(cfg.seed)
    policy = GPT.from_pretrained(run_file(run, "sft_model", files)).to(cfg.device)
    ref_policy = GPT.from_pretrained(run_file(run, "sft_model", files))
    # the reference takes no gradients: bf16 on GPU, fp32 on CPU, as PPO's (training.frozen_dtype)
    ref_policy.to(cfg.device, frozen_dtype(cfg.device))
    log(f"[dpo] {len(pairs)} judge-ordered pairs, {cfg.dpo.steps} steps of {cfg.dpo.batch_size}")
    train_dpo(policy, ref_policy, samples, pairs, tok, cfg.dpo, cfg, out_dir)
    if is_main():
        atomic_dir(Path(out_dir) / "model", lambda d: policy.save_pretrained(d, eot=tok.eot))
    barrier()
    return meter.summary(policy, remeasure=True)


def main(argv=None):
    """python dpo.py: DPO alone on an existing run (default runs/tiny), into run_dir/compare/dpo,
    or on files (--sft-model DIR --samples FILE --feedback FILE) into --out. The settings are read
    as ppo.py's and reward.py's are (config.stage_settings), but not their
    config.stage_command_line: DPO is one part of the compare stage, so it needs only sft, sample
    and feedback done (not reward and ppo), its marker is compare/dpo/done.json, and --force must
    keep the other parts of compare (d-RLAIF, RLOO, GRPO) that setting compare aside would
    delete."""
    cfg, run, force, _, given = stage_settings(
        "DPO [not in the paper] on AI feedback: an SFT model trained on the judge-ordered pairs. "
        "On a run of rlaif.py (--run-dir: into run_dir/compare/dpo, where rlaif.py --compare "
        "looks for it, with the run's recorded settings, which the flags below override and are "
        "recorded) or on files (--sft-model DIR --samples FILE --feedback FILE, into --out, no "
        "run directory).",
        argv,
        "dpo",
        DPOConfig,
        force_help="retrain DPO from step 0, a finished one (the run's evaluation and compare "
        "marker are then set aside: rlaif.py --compare redoes them) or an interrupted one",
        inputs=("sft_model", "samples", "feedback"),
        rm=RMConfig,
    )
    if given is not None:
        prepare_out(cfg, run, force, "dpo")
        splits = prepare.run_splits(cfg)
        run_alone(run, lambda: dpo_stage(cfg, None, splits, run, **given))
        return
    require_done(run, ("sft", "sample", "feedback"))
    out = run / RUN_FILES["dpo"]
    if (out / "done.json").exists() and not force:  # the part's own marker, written after its model
        raise SystemExit(f"DPO is done ({out / 'done.json'}); --force retrains it")
    with os_errors_as_messages("[dpo]"):  # a full disk, a permission: one line, exit 1
        if force and is_main():  # retrained from step 0, an interrupted DPO's checkpoint too
            if (out / "done.json").exists():
                set_aside(run, ["evaluate"])
                (run / "compare" / "done.json").unlink(missing_ok=True)
            start_over(out)
        if is_main():
            save_config(cfg, run)
        barrier()
        run_part(
            out,
            lambda o: dpo_stage(cfg, run, prepare.run_splits(cfg), o),
        )
    log(f"[dpo] done -> {out / 'model'}")


if __name__ == "__main__":
    main()
