"""End to end: every stage of rlaif.py on the micro preset, killed during PPO and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.gorilla import prepare
from evaluate import VERDICTS
from reward import read_reward_model
from runs import RUN_FILES

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "--init",
    "micro",
    "--sft-steps",
    "40",
    "--sft-eval-every",
    "20",
    "--sampled-instructions",
    "24",
    "--answers-per-instruction",
    "4",
    "--max-answer-tokens",
    "40",
    "--ppo-iterations",
    "6",
    "--ppo-batch-size",
    "8",
    "--ppo-rollouts-per-prompt",
    "4",
    "--ppo-minibatch-size",
    "4",
    "--eval-limit",
    "12",
    "--device",
    "cpu",
    "--tensorboard",
]


def run(run_dir, **kw):
    return subprocess.Popen(
        [sys.executable, "rlaif.py", "--run-dir", str(run_dir), *SMALL],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


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
    samples = [
        json.loads(line) for line in (run_dir / "sample" / "samples.jsonl").read_text().splitlines()
    ]
    feedback = [
        json.loads(line)
        for line in (run_dir / "feedback" / "feedback.jsonl").read_text().splitlines()
    ]
    sources = [s["source"] for s in samples]
    assert len(samples) == len(feedback) and sources.count("policy") == 24 * 4
    assert (
        sources.count("reference") == sources.count("mismatched") == 24
        and sources.count("no_code") <= 24
    )
    by_id = {s["id"]: s for s in samples}
    for f in feedback:  # the judge, not the pipeline, labels the contrast answers
        if by_id[f["id"]]["source"] == "mismatched":
            assert f["answers"]["domain_right"] == 0.0
        if by_id[f["id"]]["source"] == "no_code":
            assert f["answers"]["code_valid"] == 0.0
    assert {f["judge"] for f in feedback} == {"rules judge"}
    assert (run_dir / "reward" / "reward_model.pt").exists()

    def read(stage):
        return [
            json.loads(line)
            for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        ]

    metrics = read("ppo")
    # resumed mid-way: no row twice, none missing
    assert [m["iteration"] for m in metrics] == list(range(1, 7))
    assert {
        "objective/scores",
        "objective/kl",
        "objective/non_score_reward",
        "objective/entropy",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "lr",
        "episode",
        "val/explained_variance",
        "objective/score_share",
        "completions/mean_length",
        "completions/clipped_ratio",
        "val/num_eos_tokens",
    } <= set(metrics[-1])
    # validated at the end
    assert {"eval/reward", "eval/judge_score", "eval/empty_code_rate"} <= set(metrics[-1])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # --tensorboard mirrored the rows
    # greedy validation answers at iterations 1 and 6
    shown = (run_dir / "ppo" / "samples.md").read_text()
    assert (
        "### iteration 1\n" in shown
        and "### iteration 6\n" in shown
        and "| question | greedy answer |" in shown
    )
    sft_rows = read("sft")
    assert [m["step"] for m in sft_rows] == list(range(1, 41))
    assert (
        {"loss", "lr", "tokens_per_s"} <= set(sft_rows[0])
        and "val_loss" in sft_rows[19]
        and "val_loss" in sft_rows[-1]
    )
    rm_rows = read("reward")
    steps = [m["step"] for m in rm_rows if "loss" in m]
    assert steps == list(range(1, len(steps) + 1)) and steps
    assert {"loss", "accuracy", "accuracy_code_valid"} <= set(rm_rows[1])
    # step 0, every eval_every steps, the last
    measured = [m for m in rm_rows if "heldout/pairs" in m]
    assert (
        measured[0]["step"] == 0
        and measured[-1]["step"] == steps[-1]
        and "val/pairs" in measured[-1]
    )
    assert "heldout_pairwise_accuracy" in rm_rows[-1] and "kept_step" in rm_rows[-1]
    assert (run_dir / "ppo" / "model" / "model.safetensors").exists()
    results = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
    assert len(results) == 3 and [k.split()[0] for k in results] == ["SFT", "RLAIF", "Gorilla-7B"]
    assert [m["method"] for m in read("evaluate")] == list(results)
    for s in results.values():
        assert set(s) >= {
            "n",
            "executability",
            "ast_accuracy",
            "hallucination",
            "rouge_l",
            "codebleu",
        }
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and "executability" in table[0]
    assert "RULES JUDGE" in out and "FROM SCRATCH" in out


def rlaif(run_dir, *argv, small=True):
    return subprocess.run(
        [sys.executable, "rlaif.py", "--run-dir", str(run_dir), *(SMALL if small else []), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    out = rlaif(run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir


def stage_script(script, run_dir, *args):
    """A stage script (ppo.py, dpo.py, evaluate.py) run on run_dir as a user would."""
    return subprocess.run(
        [sys.executable, script, "--run-dir", str(run_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def copy_of(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_other_settings_on_a_finished_run_are_refused_and_no_flags_resume_it(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    config_before = (run_dir / "config.json").read_text()
    out = rlaif(run_dir, "--seed", "7", "--sft-steps", "999")
    assert (
        out.returncode == 1
        and "seed: 1 -> 7" in out.stderr
        and "sft.steps: 40 -> 999" in out.stderr
    ), out.stderr
    assert (run_dir / "config.json").read_text() == config_before
    out = rlaif(run_dir, small=False)  # no settings: the run's own
    assert out.returncode == 0 and "[ppo] already done" in out.stdout, out.stderr


@pytest.mark.slow
def test_a_damaged_output_is_named(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    weights = run_dir / "ppo" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100:4196] = bytes(b ^ 0xFF for b in data[100:4196])  # 4 KiB of flipped bytes
    weights.write_bytes(bytes(data))
    out = rlaif(run_dir, small=False)
    assert out.returncode == 1 and "model.safetensors has changed" in out.stderr, out.stderr
    (run_dir / "sample" / "samples.jsonl").write_text("")
    out = rlaif(run_dir, small=False)
    assert (
        out.returncode == 1
        and "samples.jsonl has changed" in out.stderr
        and "--from sample" in out.stderr
    )


@pytest.mark.slow
def test_from_keeps_old_results_until_the_new_ones_exist(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    old_model = (run_dir / "ppo" / "model" / "model.safetensors").read_bytes()
    out = rlaif(run_dir, "--from", "ppo", "--ppo-lr", "not-a-number")
    assert out.returncode == 2  # refused before anything moved
    assert (run_dir / "ppo" / "model" / "model.safetensors").read_bytes() == old_model
    # the redo killed during PPO, after its first checkpoint
    redo = subprocess.Popen(
        [sys.executable, "rlaif.py", "--run-dir", str(run_dir), *SMALL, "--from", "ppo"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600

    def started():
        return (run_dir / ".previous" / "ppo").exists() and (run_dir / "ppo" / "ckpt.pt").exists()

    while not started() and redo.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started() and redo.poll() is None
    os.killpg(redo.pid, signal.SIGKILL)
    redo.wait()
    assert (run_dir / ".previous" / "ppo" / "model" / "model.safetensors").read_bytes() == old_model
    assert (run_dir / ".previous" / "evaluate" / "done.json").exists()
    out = rlaif(run_dir, "--from", "ppo")  # a complete redo: the set-aside results go
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / ".previous").exists() and (run_dir / "evaluate" / "done.json").exists()


@pytest.mark.slow
def test_ppo_script_uses_the_run_settings_resumes_and_does_not_overwrite(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)

    def ppo(*a):
        return stage_script("ppo.py", run_dir, *a)

    out = ppo()
    assert out.returncode == 1 and "already done" in out.stderr + out.stdout
    out = ppo("--force", "--iterations", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["ppo"]["iterations"] == 2 and config["init"] == "micro" and config["seed"] == 1
    metrics = (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2
    assert not (run_dir / "evaluate").exists()  # no stale evaluation survives
    out = rlaif(run_dir, small=False)
    assert out.returncode == 0 and "[evaluate] done" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow
def test_ppo_script_on_files_needs_no_run_directory(finished, tmp_path):
    """python ppo.py --sft-model DIR --reward-model FILE: PPO into --out with the settings of
    --settings and the flags; the run the files came from is left as it was."""
    before = (finished / "ppo" / "done.json").read_text()
    out_dir = tmp_path / "alone"
    files = [
        "--sft-model",
        str(finished / "sft" / "model"),
        "--reward-model",
        str(finished / "reward" / "reward_model.pt"),
    ]

    def ppo(*a):
        argv = [sys.executable, "ppo.py", *a]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)

    settings = ["--settings", str(finished / "config.json"), "--seed", "3"]
    small = ["--iterations", "2", "--batch-size", "8", "--rollouts-per-prompt", "4"]
    out = ppo(*files, "--out", str(out_dir), *settings, *small, "--minibatch-size", "4")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (out_dir / "model" / "model.safetensors").exists() and (out_dir / "done.json").exists()
    config = json.loads((out_dir / "config.json").read_text())
    assert config["seed"] == 3 and config["ppo"]["iterations"] == 2
    assert config["compact"] is True  # the micro model's compact vocabulary
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (finished / "ppo" / "done.json").read_text() == before
    out = ppo(*files, "--out", str(out_dir))
    assert out.returncode == 1 and "already done; --force" in out.stderr
    out = ppo(files[0], files[1], "--out", str(tmp_path / "other"))
    assert out.returncode == 1 and "missing --reward-model" in out.stderr
    out = ppo(files[0], str(tmp_path / "nowhere"), *files[2:], "--out", str(tmp_path / "other"))
    assert out.returncode == 1 and "--sft-model " + str(tmp_path / "nowhere") in out.stderr
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_stage_scripts_on_files_need_no_run_directory(finished, tmp_path):
    """python judge.py --samples FILE: the run's feedback again, into --out. python reward.py /
    dpo.py --sft-model DIR --samples FILE --feedback FILE: each trains into --out; the reward model
    written there is one PPO reads. python sft.py --out DIR trains a model there. The run the files
    came from is left as it was."""
    before = {p: p.read_text() for p in finished.rglob("done.json")}
    samples, settings = finished / "sample" / "samples.jsonl", finished / "config.json"
    argv = ["judge.py", "--samples", str(samples), "--settings", str(settings)]
    out = subprocess.run(
        [sys.executable, *argv, "--out", str(tmp_path / "feedback")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = (tmp_path / "feedback" / "feedback.jsonl").read_text().splitlines()
    assert sorted(again) == sorted(
        (finished / "feedback" / "feedback.jsonl").read_text().splitlines()
    )
    files = [
        *("--sft-model", str(finished / "sft" / "model")),
        *("--samples", str(finished / "sample" / "samples.jsonl")),
        *("--feedback", str(finished / "feedback" / "feedback.jsonl")),
        *("--settings", str(finished / "config.json")),
    ]
    for script, out_dir, small, made in [
        ("reward.py", tmp_path / "rm", ["--epochs", "1"], "reward_model.pt"),
        ("dpo.py", tmp_path / "dpo", ["--steps", "2"], "model/model.safetensors"),
    ]:
        argv = [sys.executable, script, *files, "--out", str(out_dir), *small]
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert (out_dir / made).exists() and (out_dir / "done.json").exists()
    argv = ["sft.py", "--settings", str(settings), "--out", str(tmp_path / "sft"), "--steps", "2"]
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["sft"]["steps"] == 2
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()
    assert {p: p.read_text() for p in finished.rglob("done.json")} == before
    _, ckpt = read_reward_model(tmp_path / "rm" / "reward_model.pt")
    assert ckpt.get("tools") == json.loads((finished / "config.json").read_text())["rm"]["tools"]


@pytest.mark.slow
def test_compare_adds_d_rlaif_rloo_grpo_dpo_and_best_of_n_from_the_same_sft_model_and_feedback(
    finished, tmp_path
):
    run_dir = copy_of(finished, tmp_path)
    feedback = (run_dir / "feedback" / "feedback.jsonl").read_bytes()
    out = rlaif(run_dir, "--from", "compare", "--compare", "--dpo-steps", "3", "--best-of-n", "2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # the same AI feedback
    assert (run_dir / "feedback" / "feedback.jsonl").read_bytes() == feedback
    # d-RLAIF is the same PPO code: the same metrics, one row per iteration, only the score differs
    ppo_rows = [
        json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    d_rows = [
        json.loads(line)
        for line in (run_dir / "compare" / "drlaif" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(d_rows) == len(ppo_rows) and set(d_rows[0]) == set(ppo_rows[0])
    assert [r["objective/scores"] for r in d_rows] != [r["objective/scores"] for r in ppo_rows]
    # RLOO: the same rollouts and reward model, no critic (no value loss, no explained variance)
    rloo_rows = [
        json.loads(line)
        for line in (run_dir / "compare" / "rloo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rloo_rows) == len(ppo_rows) and all(
        r["val/explained_variance"] is None for r in rloo_rows
    )
    assert all("loss/value_avg" not in r and "loss/policy_avg" in r for r in rloo_rows)
    grpo_rows = [
        json.loads(line)
        for line in (run_dir / "compare" / "grpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(grpo_rows) == len(ppo_rows) and all(
        r["val/explained_variance"] is None for r in grpo_rows
    )
    results = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
    assert [k.split()[0] for k in results] == [
        "SFT",
        "RLAIF",
        "d-RLAIF",
        "RLOO",
        "GRPO",
        "DPO",
        "RS",
        "SFT",
        "SFT",
        "Gorilla-7B",
    ]
    rs = json.loads((run_dir / "compare" / "rs" / "done.json").read_text())
    assert rs["picks"] == 24  # one answer to each of the sampled instructions
    assert sum("best-of-2" in k for k in results) == 2
    picks = [
        json.loads(line)
        for line in (run_dir / "compare" / "best_of_n_rm.jsonl").read_text().splitlines()
    ]
    assert len(picks) == 12  # one answer per evaluated question


@pytest.mark.slow
def test_dpo_script_trains_on_a_runs_feedback_and_keeps_an_existing_model(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)

    def dpo(*a):
        return stage_script("dpo.py", run_dir, *a)

    out = dpo("--steps", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    weights = run_dir / "compare" / "dpo" / "model" / "model.safetensors"
    first = weights.read_bytes()
    out = dpo("--steps", "2")
    assert out.returncode != 0 and "--force" in out.stderr and weights.read_bytes() == first
    out = dpo("--force", "--steps", "3", "--lr", "1e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert weights.read_bytes() != first and not (run_dir / "evaluate").exists()
    # interrupted (its checkpoint at step 3, no marker): resumed without --force, redone with it
    (run_dir / "compare" / "dpo" / "done.json").unlink()
    out = dpo("--steps", "3", "--lr", "1e-3")
    assert out.returncode == 0 and "resumed from" in out.stdout + out.stderr, out.stderr[-3000:]
    (run_dir / "compare" / "dpo" / "done.json").unlink()
    out = dpo("--force", "--steps", "3", "--lr", "1e-3")
    assert out.returncode == 0 and "resumed" not in out.stdout + out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_plots_of_a_finished_run_are_pngs_with_their_panels(finished, tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    from evaluate import plot_runs

    made = plot_runs([finished, finished], tmp_path)
    assert made == {"curves.png": 6, "results.png": 3}
    for name, size in (("curves.png", (1500, 800)), ("results.png", (1500, 500))):
        head = (tmp_path / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == size


@pytest.mark.slow
def test_evaluate_script_without_a_source_evaluates_the_run(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)

    def ev(*a):
        return stage_script("evaluate.py", run_dir, *a)

    out = ev()
    assert out.returncode != 0 and "--force" in out.stderr  # finished: kept
    before = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
    out = ev("--force")
    assert out.returncode == 0, out.stderr[-3000:]
    after = json.loads((run_dir / "evaluate" / "done.json").read_text())["results"]
    assert {k: v["ast_accuracy"] for k, v in after.items()} == {
        k: v["ast_accuracy"] for k, v in before.items()
    }


@pytest.mark.slow
def test_evaluate_on_the_validation_split_answers_those_questions_and_says_so(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(config, eval_split="val")))
    out = stage_script("evaluate.py", run_dir, "--force")
    assert out.returncode == 0, out.stderr[-3000:]
    val = prepare.offline_splits(prepare.load_records(prepare.EVAL_FILE, skip_bad=True))["val"]
    asked = [r.line for r in val[: config["eval_limit"] or None]]
    rows = [json.loads(x) for x in (run_dir / VERDICTS).read_text().splitlines()]
    sft = [r["question_id"] for r in rows if r["method"].startswith("SFT (")]
    assert sft == asked
    assert (run_dir / RUN_FILES["results"]).read_text().startswith(f"{len(asked)} val questions")
