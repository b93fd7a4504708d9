"""End to end: every stage of rlaif.py on the micro preset, killed during PPO and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--init", "micro", "--sft-steps", "40", "--eval-every", "20", "--sample-prompts", "24",
         "--samples-per-prompt", "4", "--max-answer-tokens", "40", "--ppo-iterations", "6",
         "--ppo-batch-size", "8", "--ppo-minibatch-size", "4", "--eval-limit", "12", "--device", "cpu"]


def run(run_dir, **kw):
    return subprocess.Popen([sys.executable, "rlaif.py", "--run-dir", str(run_dir), *SMALL], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_pipeline_end_to_end_with_a_kill_during_ppo(tmp_path):
    run_dir = tmp_path / "run"
    first = run(run_dir, start_new_session=True)
    ckpt = run_dir / "ppo" / "ckpt.pt"
    deadline = time.time() + 600
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), first.communicate()[0][-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # killed during PPO, after its first checkpoint
    first.communicate()
    assert not (run_dir / "ppo" / "done.json").exists()

    second = run(run_dir)
    out = second.communicate(timeout=900)[0]
    assert second.returncode == 0, out[-3000:]
    for stage in ("sft", "sample", "feedback", "reward"):
        assert f"[{stage}] already done" in out  # finished stages are not redone
    assert "[ppo] resumed from" in out

    assert (run_dir / "sft" / "model" / "model.safetensors").exists()
    samples = [json.loads(l) for l in (run_dir / "sample" / "samples.jsonl").read_text().splitlines()]
    feedback = [json.loads(l) for l in (run_dir / "feedback" / "feedback.jsonl").read_text().splitlines()]
    sources = [s["source"] for s in samples]
    assert len(samples) == len(feedback) and sources.count("policy") == 24 * 4
    assert sources.count("reference") == sources.count("mismatched") == 24 and sources.count("no_code") <= 24
    by_id = {s["id"]: s for s in samples}
    for f in feedback:  # the judge, not the pipeline, labels the contrast answers
        if by_id[f["id"]]["source"] == "mismatched":
            assert f["answers"]["domain_right"] == 0.0
        if by_id[f["id"]]["source"] == "no_code":
            assert f["answers"]["code_valid"] == 0.0
    assert {f["judge"] for f in feedback} == {"rules judge"}
    assert (run_dir / "reward" / "reward_model.pt").exists()
    metrics = [json.loads(l) for l in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics][-1] == 6
    assert (run_dir / "ppo" / "model" / "model.safetensors").exists()
    results = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
    assert len(results) == 3 and [k.split()[0] for k in results] == ["SFT", "RLAIF", "Gorilla-7B"]
    for s in results.values():
        assert set(s) >= {"n", "executability", "ast_accuracy", "hallucination", "rouge_l", "codebleu"}
    table = [l for l in out.splitlines() if l.startswith("| ")]
    assert len(table) == 4 and "executability" in table[0]
    assert "RULES JUDGE" in out and "FROM SCRATCH" in out
