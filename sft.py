"""
Supervised fine-tuning (SFT) of GPT-2 on APIBench's (instruction -> answer) pairs: step 1 of the
paper's method (Dutta et al. 2024, section 3), the policy that feedback, the reward model and PPO
start from.

    python sft.py                      # the SFT stage of runs/tiny (--run-dir another run)

One optimizer step of train_sft, in order, after the step's learning rate is set (lr_at: linear
warmup, then cosine decay):
  1. batch: the step's examples, grouped by length (batch_at: a pure function of the step, so a
     resumed run sees the batches of an uninterrupted one); each rank takes its share (torchrun).
  2. loss: the mean negative log-likelihood of the answer tokens (sft_loss); prompts carry none.
     Gradients accumulate over sft.grad_accum micro-batches.
  3. update: AdamW, betas (0.9, 0.95), weight decay 0.1 on matrices only
     (training.make_optimizer), the gradient norm clipped at grad_clip (nanoGPT's train.py).
In one process the torchrun calls (distributed.shard, all_sum, average_gradients) return what
they are given: the step is the single-process step.
Every sft.eval_every steps: the validation loss, a checkpoint and metrics.jsonl (resumable).
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch

from config import stage_command_line
from data.gorilla import prepare
from distributed import all_sum, average_gradients, is_main, shard
from model import GPT, FlopMeter, pad_pairs, preset_config, response_logprobs
from runs import atomic_dir, log, resume, run_alone, run_stage, save_checkpoint, write_metrics
from training import (
    autocast,
    check_loss,
    length_grouped_batches,
    make_optimizer,
    progress,
    stream_seed,
)

# -----------------------------------------------------------------------------
# Settings: SFTConfig (config.Config's section sft), max_answer_tokens and grad_clip; and these,
# which no experiment changes

CPU_PRESETS = ("tiny", "micro")  # model presets trained from scratch (no GPT-2 weights offline)
WEIGHT_DECAY = 0.1  # AdamW weight decay on matrices (nanoGPT's); no experiment changed it
LOG_EVERY = 25  # steps between progress lines
VAL_BATCH_SIZE = 32  # examples per forward pass of the validation loss


@dataclass
class SFTConfig:
    """SFT's settings (rlaif.py --sft-* or --set sft.NAME=VALUE, python sft.py --*)."""

    steps: Annotated[int, "SFT optimizer steps", ">= 1"] = 800
    batch_size: Annotated[int, "SFT examples per micro-batch", ">= 1"] = 16
    grad_accum: Annotated[int, "SFT micro-batches per optimizer step", ">= 1"] = 1
    lr: Annotated[float, "SFT peak learning rate (linear warmup, cosine decay)", "> 0"] = 2e-3
    warmup: Annotated[int, "SFT warmup steps", ">= 0"] = 50
    eval_every: Annotated[
        int, "SFT validation loss and checkpoint every this many steps", ">= 1"
    ] = 100


# what a resumed SFT may change: how often it validates (the schedule follows steps)
RESUMABLE_CHANGES = ("eval_every",)


# -----------------------------------------------------------------------------
# The loop: an optimizer step is the header's three parts (the functions below, in order)


def train_sft(tok, train, val, cfg, run_cfg, out_dir, start_from=None):
    """Supervised fine-tuning on answer tokens (train, val: (prompt, answer) token lists), resumable
    from its last checkpoint. cfg: SFTConfig; run_cfg: the run's config.Config, for what SFT
    shares with the other stages (seed, device, grad_clip, init). start_from: a model to continue
    (--compare's rejection sampling), else a new one (init_model)."""
    torch.manual_seed(run_cfg.seed)
    model = (start_from or init_model(run_cfg, tok)).to(run_cfg.device)
    optimizer = make_optimizer(model, cfg.lr, WEIGHT_DECAY)
    ckpt_file, settings = Path(out_dir) / "ckpt.pt", asdict(cfg)
    step, history, _ = resume(
        ckpt_file,
        run_cfg.device,
        optimizer,
        "sft",
        log,
        settings=settings,
        may_change=RESUMABLE_CHANGES,
        model=model,
    )
    model.train()
    t0, tokens_seen, start = time.time(), 0, step
    meter = FlopMeter()
    while step < cfg.steps:
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, tokens = optimizer_step(model, optimizer, cfg, run_cfg, train, step, tok.eot)
        tokens_seen += tokens
        step += 1
        check_loss(loss, "sft", f"step {step}", "--sft-lr (the learning rate) and --grad-clip")
        speed = round(tokens_seen / (time.time() - t0))
        history.append(dict(step=step, loss=round(loss.item(), 4), lr=lr, tokens_per_s=speed))
        if step % LOG_EVERY == 0 or step == cfg.steps:
            log(
                f"[sft] step {step}/{cfg.steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"{speed:,} tok/s {meter.line(model)} "
                f"{progress(step - start, cfg.steps - start, t0)}"
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            state = dict(optimizer=optimizer.state_dict(), settings=settings)
            validate_and_save(model, state, val, tok.eot, run_cfg.device, history, out_dir)
    model.eval()
    return model, history


# -----------------------------------------------------------------------------
# The pieces, in the order they run


def init_model(run_cfg, tok):
    if run_cfg.init in CPU_PRESETS:
        return GPT(preset_config(run_cfg.init, tok.vocab_size))
    return GPT.from_pretrained(run_cfg.init)  # HF weights: a local directory or a Hub name


def training_records(run_cfg, records):
    """SFT's training records: `records` and, with run_cfg.api_pairs, the API database's pairs."""
    if not run_cfg.api_pairs:
        return records
    return records + prepare.api_database_pairs(prepare.load_api_database())


def sft_examples(run_cfg, tok, records):
    """(prompt ids, answer ids ending in <|endoftext|>): the one prompt/answer format."""
    return [
        (
            prepare.prompt_ids(tok, r.instruction),
            prepare.answer_ids(tok, r.sections, run_cfg.compact, run_cfg.max_answer_tokens),
        )
        for r in records
    ]


def batch_at(examples, batch_size, index, seed):
    """The index-th batch of SFT: epochs of batches grouped by total length
    (training.length_grouped_batches). A pure function of (index, seed): a resumed run sees exactly
    the batches of an uninterrupted one."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, i = divmod(index, per_epoch)
    keys = [len(q) + len(a) for q, a in examples]
    batches = length_grouped_batches(
        keys,
        batch_size,
        stream_seed(seed, 1_000_003, epoch),
        stream_seed(seed, 7, epoch),
        drop_last=True,
    )
    return [examples[j] for j in batches[i]]


def answer_logprobs(model, examples, pad, device):
    """Teacher-forced log-probs of the answer tokens of (prompt, answer) examples (prompt tokens
    carry none), their mask, and the batch's token count."""
    query, query_mask, response, response_mask = pad_pairs(examples, pad, device)
    with autocast(device):
        logprobs = response_logprobs(model, query, query_mask, response, response_mask)
    return logprobs, response_mask, int(query_mask.sum() + response_mask.sum())


def sft_loss(model, examples, pad, device):
    """(Mean negative log-likelihood of the answer tokens, of every rank's examples under torchrun;
    tokens in the batch)."""
    logprobs, response_mask, n_tokens = answer_logprobs(model, examples, pad, device)
    # one process: all_sum(x) is x; under torchrun, sums over every rank's answer tokens
    return -all_sum(logprobs.sum()) / all_sum(response_mask.sum()), n_tokens


def lr_at(step, max_lr, warmup, total, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * max_lr at `total` steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, total - warmup))  # fraction of the decay
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def optimizer_step(model, optimizer, cfg, run_cfg, train, step, pad):
    """Optimizer step `step` of SFT (cfg: SFTConfig): cfg.grad_accum micro-batches, gradients
    averaged over ranks and clipped, AdamW. Returns (the loss averaged over the micro-batches,
    tokens seen)."""
    tokens, step_loss = 0, 0.0
    for micro in range(cfg.grad_accum):
        index = step * cfg.grad_accum + micro
        batch = shard(batch_at(train, cfg.batch_size, index, run_cfg.seed))  # one process: all
        loss, n_tokens = sft_loss(model, batch, pad, run_cfg.device)
        (loss / cfg.grad_accum).backward()
        step_loss = step_loss + loss.detach() / cfg.grad_accum
        tokens += n_tokens
    average_gradients(model.parameters())  # torchrun: the global batch's step; one process: none
    torch.nn.utils.clip_grad_norm_(model.parameters(), run_cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, tokens


@torch.no_grad()
def validation_loss(model, examples, pad, device, batch_size=VAL_BATCH_SIZE):
    """Mean loss per answer token over `examples`; under torchrun each rank scores its share and
    the ranks' sums meet once at the end (ranks may hold different numbers of chunks)."""
    model.eval()
    examples, total, n = shard(examples), 0.0, 0
    for i in range(0, len(examples), batch_size):
        logprobs, response_mask, _ = answer_logprobs(
            model, examples[i : i + batch_size], pad, device
        )
        total, n = total - logprobs.sum().item(), n + int(response_mask.sum())
    model.train()
    total, n = all_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=device)).tolist()
    return total / max(n, 1)


def validate_and_save(model, state, val, pad, device, history, out_dir):
    """The validation loss into the step's history row, then the checkpoint (the model, `state`:
    the optimizer's and the settings) and metrics.jsonl (from the checkpointed history: a resumed
    run writes no row twice)."""
    step = history[-1]["step"]
    history[-1]["val_loss"] = round(validation_loss(model, val, pad, device), 4)
    log(f"[sft] step {step} val loss {history[-1]['val_loss']:.3f}")
    if is_main():
        save_checkpoint(
            Path(out_dir) / "ckpt.pt",
            model=model.state_dict(),
            **state,
            step=step,
            history=history,
        )
        write_metrics(Path(out_dir) / "metrics.jsonl", history)


# -----------------------------------------------------------------------------
# The SFT stage of a run (rlaif.py, or python sft.py on an existing run)


def sft_stage(run_cfg, run, splits, out_dir=None):
    """Stage 1: the SFT model, trained on the training split (and the API database's pairs), saved
    to run_dir/sft/model (out_dir/model: python sft.py --out DIR, no run directory)."""
    out_dir = Path(out_dir or run / "sft")
    tok = prepare.tokenizer(run_cfg.compact)
    train = sft_examples(run_cfg, tok, training_records(run_cfg, splits["train"]))
    val = sft_examples(run_cfg, tok, splits["val"])
    meter = FlopMeter()
    model, history = train_sft(tok, train, val, run_cfg.sft, run_cfg, out_dir)
    if is_main():
        atomic_dir(out_dir / "model", lambda d: model.save_pretrained(d, eot=tok.eot))
    return dict(
        train_examples=len(train),
        final_loss=history[-1]["loss"],
        val_loss=[h["val_loss"] for h in history if "val_loss" in h][-1],
        **meter.summary(model, remeasure=True),
    )


def main(argv=None):
    """python sft.py: the SFT stage alone, on an existing run (default runs/tiny), or into --out
    without a run directory."""
    run_cfg, run, given = stage_command_line(
        "sft",
        "SFT: fine-tune the model on the training split. On a run of rlaif.py (--run-dir: into "
        "run_dir/sft, with the run's recorded settings, which the flags below override and are "
        "recorded; later stages are set aside) or into --out (no run directory; the settings of "
        "--settings or the defaults). An interrupted SFT resumes.",
        argv,
        "sft",
        SFTConfig,
        inputs=(),
    )
    splits = prepare.run_splits(run_cfg)
    if given is not None:
        run_alone(run, lambda: sft_stage(run_cfg, None, splits, out_dir=run))
    else:
        run_stage(run_cfg, run, "sft", sft_stage, splits)


if __name__ == "__main__":
    main()
