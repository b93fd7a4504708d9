"""Benchmark (a script, not a test): run the default pipeline and print each stage's wall time and
throughput, and the total. Run it with nothing else running on the machine:

    python tests/bench_pipeline.py [--run-dir /tmp/bench] [-- extra rlaif.py flags]
    python tests/bench_pipeline.py --report --run-dir runs/tiny   # a finished run's stage times

Wall times differ between hosts of the same size (docs/benchmarks.md saw torch.mm run at 92 and
at 422 GFLOP/s on 2 cores), so the machine's torch.mm rate is printed beside them.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data.gorilla import prepare  # noqa: E402
from model import matmul_rate, preset_config  # noqa: E402


def mm_rate(repeat=20):
    """GFLOP/s of torch.mm at the shape of a gpt2-small MLP layer (1024 x 768 @ 768 x 3072)."""
    a, b = torch.randn(1024, 768), torch.randn(768, 3072)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * 1024 * 768 * 3072 * repeat / (time.perf_counter() - t0) / 1e9


def stage_table(run_dir, log):
    """Markdown: each stage's minutes and SFT's and PPO's last tok/s, as the log printed them.
    A stage the log does not time falls back to its done.json (a later `--compare` rewrites
    evaluate/done.json, so the log's first "done in" is the default's own)."""
    rates = {
        "sft": re.findall(r"\[sft\] step .* ([\d,]+) tok/s", log),
        "ppo": re.findall(r"\[ppo\] it .* (\d+) tok/s", log),
    }
    lines = [
        "| stage | wall time (min) | throughput | model GFLOP/s | MFU |",
        "|---|---|---|---|---|",
    ]
    for stage in ("sft", "sample", "feedback", "reward", "ppo", "evaluate"):
        done = json.loads((Path(run_dir) / stage / "done.json").read_text())
        timed = re.findall(rf"^\[{stage}\] done in (\d+)s", log, re.M)
        seconds = float(timed[0]) if timed else done["seconds"]
        rate = f"{rates[stage][-1]} tok/s" if rates.get(stage) else ""
        # model.FlopMeter's figures (done.json), where the stage runs a model
        flops = f"{done['model_gflops_per_s']:.1f}" if "mfu" in done else ""
        mfu = f"{done['mfu']:.0%}" if "mfu" in done else ""
        lines.append(f"| {stage} | {seconds / 60:.1f} | {rate} | {flops} | {mfu} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default="/tmp/rlaif-bench", help="a new run directory")
    p.add_argument("extra", nargs="*", help="more rlaif.py flags, after --")
    p.add_argument("--report", action="store_true", help="only print a finished run's table")
    args = p.parse_args()
    log_file = Path(args.run_dir + ".log")
    tiny = preset_config("tiny", prepare.tokenizer(compact=True).vocab_size)
    print(
        f"machine: torch.mm {mm_rate():.0f} GFLOP/s at gpt2-small's MLP shape, "
        f"{matmul_rate(tiny) / 1e9:.0f} at the tiny model's (the MFU yardstick), "
        f"{torch.get_num_threads()} threads"
    )
    if args.report:
        log = log_file.read_text() if log_file.exists() else ""
        return print(stage_table(args.run_dir, log))
    t0 = time.time()
    with open(log_file, "w") as out:
        rc = subprocess.call(
            [sys.executable, "rlaif.py", "--run-dir", args.run_dir, *args.extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    total = time.time() - t0
    if rc:
        sys.exit(f"rlaif.py failed ({rc}); see {log_file}")
    print(stage_table(args.run_dir, log_file.read_text()))
    print(f"total (process): {total / 60:.1f} min")


if __name__ == "__main__":
    main()
