"""A rehearsal of the paper configuration on CPU, every real component real: GPT-2 weights from a
local Hugging Face directory (random, full 50,257-token vocabulary, saved by transformers) through
the same loading code as a Hub download; the train file through `datasets` from a local file with
the Hub file's schema; the judge through the `openai` client against an OpenAI-compatible server on
127.0.0.1 (log-probs, no key); real-mode executability; then `python ppo.py` on the run, and
evaluation again. Only sizes are overridden. A GPU user runs the same command with --device cuda
before spending money."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tests.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
SIZES = [
    "--max-answer-tokens",
    "48",
    "--sft-steps",
    "4",
    "--set",
    "sft.batch_size=2",
    "--set",
    "sft.grad_accum=1",
    "--sft-eval-every",
    "2",
    "--sampled-instructions",
    "4",
    "--answers-per-instruction",
    "2",
    "--ppo-iterations",
    "2",
    "--ppo-batch-size",
    "4",
    "--ppo-rollouts-per-prompt",
    "2",
    "--ppo-minibatch-size",
    "2",
    "--ppo-grad-accum",
    "1",
    "--set",
    "rm.batch_size=2",
    "--eval-limit",
    "3",
    "--exec-timeout",
    "120",
]


@pytest.mark.slow
def test_paper_configuration_rehearsal(tmp_path):
    transformers = pytest.importorskip("transformers")
    weights = tmp_path / "gpt2-random"
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=50257
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(weights)
    # the Hub file's schema: code, api_call, provider, api_data
    train_file = tmp_path / "huggingface_train.json"
    lines = (ROOT / "data" / "gorilla" / "huggingface_eval.json").read_text().splitlines()
    train_file.write_text("\n".join(lines[:40]) + "\n")
    # P(yes) varies with the prompt: feedback with one score for every answer is refused before
    # the reward model (reward.refuse_uniform_feedback)
    server = FakeOpenAI(
        default="logprobs",
        p_yes=lambda body: (
            0.2 + 0.6 * (zlib.crc32(body["messages"][0]["content"].encode()) % 101) / 100
        ),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")} | {
        "HF_HUB_OFFLINE": "1"
    }
    run_dir = tmp_path / "run"
    try:
        out = subprocess.run(
            [
                sys.executable,
                "rlaif.py",
                "--config",
                "paper",
                "--device",
                "cpu",
                "--run-dir",
                str(run_dir),
                "--init",
                str(weights),
                "--train-file",
                str(train_file),
                "--judge-base-url",
                server.url,
                *SIZES,
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert len(server.requests) == 4 * 2 * 6 and all(r["logprobs"] for r in server.requests)
        recorded = json.loads((run_dir / "config.json").read_text())
        assert (
            recorded["compact"] is False
            and recorded["judge"] == "openai"
            and recorded["exec_mode"] == "real"
        )
        assert "train = " + str(train_file) in out.stdout
        results = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
        gorilla = [v for k, v in results.items() if k.startswith("Gorilla")][0]
        assert gorilla["n"] == 3 and "executability" in gorilla
        feedback = [
            json.loads(line)
            for line in (run_dir / "feedback" / "feedback.jsonl").read_text().splitlines()
        ]
        assert {f["judge"] for f in feedback} == {
            f"LLM judge gpt-3.5-turbo at {server.url}"
        } and all(f["score"] is not None for f in feedback)
        # full vocabulary: tokenizer files exported
        assert (run_dir / "sft" / "model" / "vocab.json").exists()

        out = subprocess.run(
            [sys.executable, "ppo.py", "--run-dir", str(run_dir), "--force", "--iterations", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert not (run_dir / "evaluate").exists()
        out = subprocess.run(
            [sys.executable, "rlaif.py", "--run-dir", str(run_dir)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert out.returncode == 0 and "| RLAIF" in out.stdout, (
            out.stdout[-3000:] + out.stderr[-3000:]
        )
    finally:
        server.close()
