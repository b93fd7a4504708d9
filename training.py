"""
What the stages share to train and run a model: AdamW (weight decay, if any, on matrices only), bf16
autocast and the dtype of a model that takes no gradients, the seeds of a run's random streams,
batches of similar length, the checks that stop a stage with nothing to train on or a loss that
diverged, progress lines, and freed memory kept in the process (glibc). A helper only one stage uses
lives in that stage's file (sft.lr_at).
"""

import ctypes
import math
import random
import time

import torch

from runs import log


def make_optimizer(module, lr, weight_decay=0.1, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only: biases, LayerNorms (1-D) are not decayed
    (nanoGPT)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
        dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0),
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def autocast(device):
    """bf16 autocast on GPU; a no-op context on CPU (same code path either way)."""
    return torch.autocast(
        device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")
    )


def frozen_dtype(device):
    """The dtype of a model that takes no gradients (PPO's and DPO's reference, the reward model
    under PPO): bf16 on GPU halves its memory, and autocast computes in bf16 there anyway."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def stream_seed(seed, stream, index):
    """The seed of draw `index` (an epoch, an iteration) of one stream of random numbers of a run:
    seed * stream + index. Streams drawn from the same kind of generator (SFT's shuffle and batch
    order, the reward model's) take different multipliers, so that they do not share a seed; PPO's
    prompt choice (Python's random) and its sampling (a torch.Generator) share 104729 but not a
    generator. The values are the ones the stages always used."""
    return seed * stream + index


def length_grouped_batches(keys, batch_size, shuffle_seed, batch_seed, drop_last=False):
    """Batches of indices with little padding but random content: a seeded shuffle, cut into groups
    of 32 batches (wide enough to find similar lengths, narrow enough to stay random), each group
    sorted by `keys` (a length, or (prompt length // 16, answer length) where prompts are left- and
    answers right-padded, so both should agree), then the batches shuffled."""
    order = list(range(len(keys)))
    random.Random(shuffle_seed).shuffle(order)
    group = 32 * batch_size
    order = [
        j
        for g in range(0, len(order), group)
        for j in sorted(order[g : g + group], key=lambda j: keys[j])
    ]
    end = (
        len(order) // batch_size * batch_size
        if drop_last and len(order) >= batch_size
        else len(order)
    )
    batches = [order[b : b + batch_size] for b in range(0, end, batch_size)]
    random.Random(batch_seed).shuffle(batches)
    return batches


def check_loss(loss, stage, step, look_at):
    """Stop a training stage whose loss is NaN or infinite, whatever caused it (a learning rate
    too large, a reward or penalty that is not a number, an overflow): the weights it would save
    are no longer numbers, and every later stage would build on them. Called by each training loop
    with its step and the settings most likely to blame; nothing is written after it."""
    value = loss.item() if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise SystemExit(
            f"[{stage}] the training loss is {value} at {step}: training diverged, and no model "
            f"is written. Look at {look_at}, then run the stage again with other settings"
        )


def require_items(items, stage, what, cause):
    """Stop a stage whose input turned out empty (`what`, e.g. 'judge-ordered pairs'), naming the
    cause, rather than train on nothing and pass the untrained model on as if trained."""
    if not items:
        raise SystemExit(f"[{stage}] nothing to train on: 0 {what} ({cause}); no model is written")


def progress(done, total, t0):
    """'(elapsed, ETA)' of a loop that has done `done` of `total` units since time t0: every stage's
    progress lines end with it."""
    elapsed = time.time() - t0
    eta = elapsed / done * (total - done) if done else float("nan")
    return f"({elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)"


def progress_log(tag, unit, speed=lambda: ""):
    """on_batch(done, total) for a loop that reports its own progress (model.sample_answers): logs
    '[tag] done/total unit SPEED (elapsed, ETA)', timed from now; speed() says how fast (MFU)."""
    t0 = time.time()
    return lambda done, total: log(
        f"[{tag}] {done}/{total} {unit} {speed()} {progress(done, total, t0)}"
    )


def keep_freed_memory():
    """Keep the memory torch frees inside the process (Linux, glibc) instead of handing it back to
    the kernel. On CPU, every step allocates and frees tensors of hundreds of MB (the logits and
    their gradients); glibc serves each from a fresh mmap, whose pages the kernel zeroes again on
    first touch, about a tenth of the default run's CPU time. Where memory comes from changes no
    number (docs/benchmarks.md); the same reason PyTorch's CPU tuning guide suggests jemalloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, not from mmap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of free heap


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>
