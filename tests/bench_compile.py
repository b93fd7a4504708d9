"""Does torch.compile pay on this CPU? The default's SFT step (tiny preset, real batches of the
training split), eager against its transformer blocks compiled (inductor, dynamic shapes: every
length-grouped batch has its own length). Prints numbers; asserts nothing.

    python tests/bench_compile.py [--steps 20]

The two models take turns, step by step, so that other work on the host slows both alike; the
compiled one's first steps (its compile time) are timed apart.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rlaif  # noqa: E402
import sft  # noqa: E402
from data.gorilla import prepare  # noqa: E402
from training import make_optimizer  # noqa: E402


def step_fn(model, cfg, train, pad):
    optimizer = make_optimizer(model, 1e-4, sft.WEIGHT_DECAY)

    def step(index):
        loss, _ = sft.sft_loss(model, sft.batch_at(train, cfg.sft.batch_size, index, 1), pad, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each (after 2 warm-up)")
    args = p.parse_args()
    cfg = rlaif.make_config("tiny")
    tok = prepare.tokenizer(cfg.compact)
    splits = prepare.run_splits(cfg)
    train = sft.sft_examples(cfg, tok, sft.training_records(cfg, splits["train"]))
    torch.manual_seed(0)
    eager = sft.init_model(cfg, tok)
    compiled = copy.deepcopy(eager)
    for block in compiled.transformer.h:
        block.forward = torch.compile(block.forward, dynamic=True)
    steps = dict(
        eager=step_fn(eager, cfg, train, tok.eot), compiled=step_fn(compiled, cfg, train, tok.eot)
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tiny preset, batch 16")
    seconds = dict(eager=0.0, compiled=0.0)
    for i in range(2 + args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(i)
            dt = time.perf_counter() - t0
            if i < 2:
                print(f"warm-up step {i} {name}: {dt:.2f} s")
            else:
                seconds[name] += dt
    for name, s in seconds.items():
        print(f"{name}: {s / args.steps:.3f} s a step over {args.steps} steps")
    print(f"compiled / eager: {seconds['compiled'] / seconds['eager']:.2f}x the time")


if __name__ == "__main__":
    main()
