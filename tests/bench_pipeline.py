"""Benchmark (a script, not a test): run the default pipeline and print each stage's wall time and
throughput, and the total. Run it with nothing else running on the machine:

    python tests/bench_pipeline.py [--run-dir /tmp/bench] [-- extra rlaif.py flags]
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", default="/tmp/rlaif-bench", help="a new run directory")
    p.add_argument("extra", nargs="*", help="more rlaif.py flags, after --")
    args = p.parse_args()
    log_file = Path(args.run_dir + ".log")
    t0 = time.time()
    with open(log_file, "w") as out:
        rc = subprocess.call(
            [sys.executable, "rlaif.py", "--run-dir", args.run_dir, *args.extra],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    total = time.time() - t0
    log = log_file.read_text()
    if rc:
        sys.exit(f"rlaif.py failed ({rc}); see {log_file}")
    rates = {
        "sft": re.findall(r"\[sft\] step .* ([\d,]+) tok/s", log),
        "ppo": re.findall(r"\[ppo\] it .* (\d+) tok/s", log),
    }
    print("| stage | wall time (min) | throughput |\n|---|---|---|")
    for stage in ("sft", "sample", "feedback", "reward", "ppo", "evaluate"):
        done = json.loads((Path(args.run_dir) / stage / "done.json").read_text())
        rate = f"{rates[stage][-1]} tok/s" if rates.get(stage) else ""
        print(f"| {stage} | {done['seconds'] / 60:.1f} | {rate} |")
    print(f"| total (process) | {total / 60:.1f} | |")


if __name__ == "__main__":
    main()
