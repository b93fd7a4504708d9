"""
RLAIF for code generation with API usage (Dutta et al. 2024, arXiv 2406.20060), end to end.

    python rlaif.py                  # offline default: tiny GPT-2 from scratch, rules judge, CPU
    python rlaif.py --config paper   # gpt2-large from HF weights, GPT-3.5 judge, one GPU, online

The paper's method, one stage each, in order. Every stage reads its inputs from --run-dir, writes
its outputs under run_dir/<stage>/ and a done.json (summary + hashes of its outputs); a finished
stage is skipped on the next run, so an interrupted run resumes where it stopped. The data (the
Gorilla APIBench HuggingFace split, data/gorilla/prepare.py) is read before the first stage.
  1. sft       supervised fine-tuning on (instruction -> answer)  sft.sft_stage
  2. sample    answers to training instructions from SFT          sample_stage, model.sample_answers
  3. feedback  AI feedback: yes/no questions to a judge -> score  judge.feedback_stage
  4. reward    reward model trained on the judge's scores         reward.reward_stage
  5. ppo       PPO against the reward model, KL penalty to SFT    ppo.ppo_stage
  6. compare   [not in the paper, --compare] the same feedback    compare_stage below, dpo.py
               six more ways: d-RLAIF (PPO on the judge's score), RLOO, GRPO, DPO, rejection
               sampling, best-of-n
  7. evaluate  SFT vs RLAIF (vs those) vs Gorilla-7B, held out    evaluate.evaluate_stage
Here: the presets, the sample and compare stages, the checks made before any stage runs, the run
directory and the command line. Results land in run_dir/evaluate/results.md (and in its done.json).
Every setting is a field of config.Config (SFT's, PPO's, the reward model's and DPO's in their
own files).
"""

import argparse
import importlib.util
import json
import random
import re
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import torch

import dpo
import evaluate
import ppo
import reward
import sandbox
import sft
from config import (
    DRIVER_FLAGS,
    Config,
    add_flags,
    apply_overrides,
    check_settings,
    load_config,
    save_config,
    set_overrides,
    setting_label,
    settings_diff,
    settings_problems,
)
from data.gorilla import prepare
from data.gorilla.apis import APIDatabase
from distributed import DIST, barrier, is_main, setup_distributed
from dpo import DPOConfig
from judge import (
    QUESTIONS,
    Feedback,
    feedback_stage,
    judge_plan,
    judge_price,
    judge_problems,
    judge_score,
    judge_score_fn,
    judge_setting_problems,
    plan_text,
    run_judge,
)
from model import GPT, FlopMeter, matmul_rate, preset_config, sample_answers
from model import PRESETS as MODEL_PRESETS
from ppo import PPOConfig
from reward import RMConfig
from runs import (
    RUN_FILES,
    STAGE_ORDER,
    Sample,
    atomic_dir,
    log,
    open_tensorboard,
    os_errors_as_messages,
    read_rows,
    run_part,
    run_stage,
    set_aside,
    verify_done,
    write_jsonl,
    write_rows,
)
from sft import CPU_PRESETS, SFTConfig, sft_stage
from training import autocast, keep_freed_memory, progress_log

CODE_TAG = "<<<code>>>:"
# Config's sections, in their stages' files
SECTION_CLASSES = dict(sft=SFTConfig, ppo=PPOConfig, rm=RMConfig, dpo=DPOConfig)


# The paper's configuration (section 4): only what differs from the tiny defaults.
PAPER = dict(
    run_dir="runs/paper",
    device="cuda",
    init="gpt2-large",
    compact=False,
    api_pairs=False,
    train_file=prepare.HUB_TRAIN,
    max_answer_tokens=512,
    sampled_instructions=2000,
    temperature=1.0,
    contrast_answers=False,
    judge="openai",
    exec_mode="real",
    exec_timeout=300.0,
    sft=dict(steps=3000, batch_size=8, grad_accum=4, lr=5e-5, warmup=100, eval_every=250),
    ppo=dict(iterations=200, batch_size=64, minibatch_size=8, grad_accum=2, epochs=4, lr=1e-5),
    rm=dict(lr=1e-5, batch_size=8),
)
PRESETS = {"tiny": {}, "paper": PAPER}


def make_config(preset="tiny", **overrides):
    """Config of a preset (every setting of config.Config) with overrides: top-level names,
    sft_<name> / ppo_<name> / rm_<name> / dpo_<name>, or ppo=dict(...)."""
    cfg = Config(**{name: cls() for name, cls in SECTION_CLASSES.items()})
    return apply_overrides(apply_overrides(cfg, PRESETS[preset], f"preset {preset}"), overrides)


# -----------------------------------------------------------------------------
# 2. Sample answers from the SFT policy


def sample_stage(cfg, run, splits):
    """answers_per_instruction answers to each of the first sampled_instructions training
    instructions (a seeded shuffle)."""
    tok, train = prepare.tokenizer(cfg.compact), splits["train"]
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    chosen = order[: cfg.sampled_instructions]
    prompts = [
        prepare.prompt_ids(tok, train[i].instruction)
        for i in chosen
        for _ in range(cfg.answers_per_instruction)
    ]
    responses, speed = sft_answers(cfg, run, prompts, tok.eot)
    samples = [
        Sample(
            id=k,
            record=chosen[k // cfg.answers_per_instruction],
            source="policy",
            query=q,
            response=r,
            answer=tok.decode(r),
        )
        for k, (q, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    if cfg.contrast_answers:
        samples += contrast_answers(cfg, tok, train, chosen, samples, start_id=len(samples))
    write_rows(run / RUN_FILES["samples"], samples)
    return dict(samples=len(samples), **speed)


def sft_answers(cfg, run, prompts, eot):
    """(The SFT model's answers (token lists) to token-list prompts, sampled at cfg.temperature,
    its speed: model.FlopMeter's summary): the sample stage's and best-of-n's."""
    model = GPT.from_pretrained(run / RUN_FILES["sft_model"]).to(cfg.device)
    meter = FlopMeter()
    with autocast(cfg.device):
        answers = sample_answers(
            model,
            prompts,
            eot,
            cfg.max_answer_tokens,
            cfg.temperature,
            cfg.seed,
            on_batch=progress_log("generate", "answers", lambda: meter.line(model)),
        )
    return answers, meter.summary(model, remeasure=True)


def contrast_answers(cfg, tok, train, chosen, samples, start_id):
    """[not in the paper] For each sampled instruction, three more answers for the judge to score:
    its reference answer; the reference of an instruction from another domain; and one of the
    policy's own answers to it with the code section cut off. Policy samples to one instruction
    rarely differ in relevance and almost never lack code, so without these the reward model had no
    pairs that teach either (docs/experiments.md). Each pair of these differs in exactly one of the
    two properties."""
    rng = random.Random(cfg.seed + 1)
    domains = [r.api_data.get("domain") for r in train]
    elsewhere = {d: [j for j, e in enumerate(domains) if e != d] for d in set(domains)}
    with_code = {}
    for s in samples:
        if (
            s.record not in with_code
            and prepare.parse_answer(s.answer)["code"]
            and CODE_TAG in s.answer
        ):
            with_code[s.record] = s
    out = []
    for i in chosen:
        other = rng.choice(elsewhere[domains[i]])
        query = prepare.prompt_ids(tok, train[i].instruction)
        answers = [
            (
                "reference",
                prepare.answer_ids(tok, train[i].sections, cfg.compact, cfg.max_answer_tokens),
            ),
            (
                "mismatched",
                prepare.answer_ids(tok, train[other].sections, cfg.compact, cfg.max_answer_tokens),
            ),
        ]
        if i in with_code:
            policy = with_code[i].answer
            answers.append(
                (
                    "no_code",
                    tok.encode(policy[: policy.index(CODE_TAG) + len(CODE_TAG)]) + [tok.eot],
                )
            )
        for source, response in answers:
            out.append(
                Sample(
                    id=start_id + len(out),
                    record=i,
                    source=source,
                    query=query,
                    response=response,
                    answer=tok.decode(response),
                )
            )
    return out


# -----------------------------------------------------------------------------
# 6. [not in the paper] The same feedback used six more ways, for one table (--compare)


def compare_stage(cfg, run, splits):
    """From the same SFT model and the same AI feedback as the paper's PPO: d-RLAIF (the same PPO
    with the judge's score as the reward), RLOO and GRPO (the same rollouts and reward model, no
    critic), DPO on the judge-ordered pairs, and best-of-n on the test questions (n samples each,
    picked by the reward model, and by the judge itself for reference)."""
    if not cfg.compare:
        return dict(skipped="--compare not given")
    tok = prepare.tokenizer(cfg.compact)
    feedback = read_rows(run / RUN_FILES["feedback"], Feedback)
    judge = run_judge(cfg, run / RUN_FILES["judge_cache"])
    # Each part is skipped only when its own done.json, written after its model, says it finished.
    run_part(
        run / RUN_FILES["drlaif"],
        lambda out: ppo.ppo_stage(
            cfg, run, splits, judge_score_fn(judge, splits["train"], tok, feedback), out
        ),
        "[compare] d-RLAIF: PPO with the judge's score as the reward",
    )
    run_part(
        run / RUN_FILES["rloo"],
        lambda out: ppo.ppo_stage(cfg, run, splits, out_dir=out, advantage="rloo"),
        "[compare] RLOO: the same rollouts and reward model, a leave-one-out baseline instead of "
        "the critic",
    )
    run_part(
        run / RUN_FILES["grpo"],
        lambda out: ppo.ppo_stage(cfg, run, splits, out_dir=out, advantage="grpo"),
        "[compare] GRPO: the same rollouts and reward model, group-normalised scores, the KL as "
        "a loss",
    )
    run_part(run / RUN_FILES["dpo"], lambda out: dpo.dpo_stage(cfg, run, splits, out))
    run_part(
        run / RUN_FILES["rs"],
        lambda out: rejection_sampling(cfg, run, splits, out),
        "[compare] rejection sampling: SFT continued on the reward model's best of each "
        "training prompt's sampled answers",
    )
    if is_main():  # under torchrun, rank 0 alone samples the test answers (the other ranks wait)
        best_of_n_answers(cfg, run, evaluate.eval_questions(cfg, splits), judge, tok)
    return dict(best_of_n=cfg.best_of_n)


RS_EPOCHS = 2  # passes over the picks [untuned: chosen before any run, not on validation]


def rejection_sampling(cfg, run, splits, out):
    """[not in the paper] Rejection-sampling fine-tuning (expert iteration; Touvron et al. 2023,
    Llama 2, section 3.2.3; RAFT; ReST): of the sample stage's answers_per_instruction answers to
    each training prompt, the one the reward model scores best (with PPO's end-of-text penalty),
    and SFT continued on those picks from the SFT model, at the learning rate SFT ended with (its
    cosine floor, 0.1 x sft.lr). The simplest use of the reward model that PPO must beat."""
    tok = prepare.tokenizer(cfg.compact)
    samples = read_rows(run / RUN_FILES["samples"], Sample)
    policy = {s.id: s for s in sorted(samples, key=lambda s: s.id) if s.source == "policy"}
    scores = reward_model_scores(cfg, run, policy, tok)
    picks = rejection_sampling_picks(
        list(policy.values()), scores, tok.eot, cfg.answers_per_instruction, cfg.ppo
    )
    examples = [(s.query, s.response) for s in picks]
    steps = max(1, RS_EPOCHS * len(examples) // cfg.sft.batch_size)
    rs_sft = replace(cfg.sft, lr=0.1 * cfg.sft.lr, warmup=0, steps=steps)
    start = GPT.from_pretrained(run / RUN_FILES["sft_model"])
    val = sft.sft_examples(cfg, tok, splits["val"])
    meter = FlopMeter()
    model, history = sft.train_sft(tok, examples, val, rs_sft, cfg, out, start_from=start)
    if is_main():
        atomic_dir(out / "model", lambda d: model.save_pretrained(d, eot=tok.eot))
    val_loss = [h["val_loss"] for h in history if "val_loss" in h][-1]
    return dict(
        picks=len(examples), steps=steps, val_loss=val_loss, **meter.summary(model, remeasure=True)
    )


def rejection_sampling_picks(answers, scores, eot, n, ppo_cfg):
    """Of each group of n consecutive answers (one prompt's, in the sample stage's order), the one
    with the best score after PPO's end-of-text penalty (ppo_cfg.missing_eos_penalty)."""
    ended = torch.tensor([s.response[-1] == eot for s in answers])
    scores = ppo.eos_penalised(torch.as_tensor(scores), ended, ppo_cfg.missing_eos_penalty)
    for i in range(0, len(answers), n):
        if len({s.record for s in answers[i : i + n]}) != 1:
            raise ValueError(f"samples {i}-{i + n - 1}: not {n} answers to one prompt")
    return [answers[j] for j in reward.best_of_n(scores.tolist(), n)]


def reward_model_scores(cfg, run, samples, tok):
    """The run's reward model's scores of samples ({id: Sample}), in their order, as PPO reads
    them (with each answer's tool report when the reward model was trained with one)."""
    rm, rm_ckpt = reward.read_reward_model(run / RUN_FILES["reward_model"], cfg.device)
    if rm_ckpt.get("tools"):
        samples = reward.reading_reports(samples, tok, APIDatabase())
    return reward.rm_scores(rm, samples, list(samples), tok, cfg.device)


def best_of_n_answers(cfg, run, test, judge, tok):
    """best_of_n SFT samples per test question; the reward model's pick and the judge's are kept."""
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in test for _ in range(cfg.best_of_n)]
    log(
        f"[compare] best-of-{cfg.best_of_n}: {len(prompts)} samples of the SFT model on the test "
        "questions"
    )
    responses, _ = sft_answers(cfg, run, prompts, tok.eot)
    samples = {
        i: Sample(i, i // cfg.best_of_n, "policy", q, r, tok.decode(r))
        for i, (q, r) in enumerate(zip(prompts, responses, strict=True))
    }
    rm_score = reward_model_scores(cfg, run, samples, tok).tolist()
    answers = [s.answer for s in samples.values()]
    judge_scores = [judge_score(judge, test[i // cfg.best_of_n], a) for i, a in enumerate(answers)]
    for name, scores in (("rm", rm_score), ("judge", judge_scores)):
        picked = [
            dict(question_id=r.line, text=answers[j])
            for r, j in zip(test, reward.best_of_n(scores, cfg.best_of_n), strict=True)
        ]
        write_jsonl(run / RUN_FILES["best_of_n"].format(pick=name), picked)


# -----------------------------------------------------------------------------
# The driver: the stages in order, each skipped when its done.json exists and its outputs are intact

STAGES = {  # runs.STAGE_ORDER names them in this order (a test holds the two equal)
    "sft": sft_stage,
    "sample": sample_stage,
    "feedback": feedback_stage,
    "reward": reward.reward_stage,
    "ppo": ppo.ppo_stage,
    "compare": compare_stage,
    "evaluate": evaluate.evaluate_stage,
}


def reachable(host, port=443, timeout=3.0):
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_ready(cfg):
    """Everything that can be known before any stage runs, so a run never fails after hours of
    work."""
    problems = []
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        problems.append(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")
    elif cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(
            f"--device {cfg.device}: no CUDA GPU is visible to torch here; use --device cpu"
        )
    if (
        cfg.init not in CPU_PRESETS
        and not Path(cfg.init).is_dir()
        and not reachable("huggingface.co")
    ):
        problems.append(
            f"--init {cfg.init}: not a local directory, and the Hugging Face Hub is unreachable "
            "(offline?): pass a directory with config.json + model.safetensors"
        )
    if cfg.train_file == prepare.HUB_TRAIN and not reachable("huggingface.co"):
        problems.append(
            "--train-file hub: the Hugging Face Hub is unreachable (offline?); "
            "--train-file '' uses "
            "the offline split of the eval file, or give a local copy of huggingface_train.json"
        )
    elif (
        cfg.train_file
        and cfg.train_file != prepare.HUB_TRAIN
        and not Path(cfg.train_file).is_file()
    ):
        problems.append(f"--train-file {cfg.train_file}: no such file")
    if cfg.judge == "openai":
        # one request: the probe
        problems += judge_problems(cfg.judge_base_url, cfg.judge_model)
    if cfg.exec_mode != "none":
        reason = sandbox.isolation_available()
        if reason and (cfg.exec_mode == "real" or not cfg.unsafe_exec):
            problems.append(
                f"--exec-mode {cfg.exec_mode}: OS-level isolation is unavailable ({reason}); "
                "generated code is not run without it (offline mode: --unsafe-exec forces it)"
            )
    if cfg.compact and cfg.init not in CPU_PRESETS:
        problems.append(
            f"--init {cfg.init} has GPT-2's vocabulary; the compact vocabulary is for models "
            "trained "
            "from scratch: add --no-compact"
        )
    if problems:
        raise SystemExit("rlaif.py: cannot start:\n  " + "\n  ".join(problems))
    if DIST.world > 1 and cfg.device == "cpu" and torch.cuda.is_available():
        log(
            f"[rlaif] note: {DIST.world} ranks on the CPU although a GPU is visible "
            "(--device cuda uses it)"
        )


def refuse_bad_settings(cfg):
    """Every setting within its declared type and range (config.check_settings), then the checks
    across settings; before the first stage, so that no setting is refused after hours of work."""
    if settings_problems(cfg):  # the checks across settings below take each one in its range
        check_settings(cfg)
    problems = []
    for advantage in sorted({cfg.ppo.advantage} | ({"rloo", "grpo"} if cfg.compare else set())):
        # PPO's own checks across its settings (under torchrun: ranks too), for each PPO the run
        # trains
        try:
            ppo.check_config(replace(cfg.ppo, advantage=advantage))
        except ValueError as e:
            problems.append(
                f"{e}"
                + (
                    ""
                    if advantage == cfg.ppo.advantage
                    else f" (--compare's {advantage.upper()} row)"
                )
            )
    # a price to keep --judge-max-usd with, and a --judge-price that parses
    if cfg.judge == "openai":
        problems += judge_setting_problems(cfg.judge_model, cfg.judge_max_usd, cfg.judge_price)
    if not cfg.contrast_answers and cfg.answers_per_instruction < 2:
        problems.append(
            f"--answers-per-instruction {cfg.answers_per_instruction}: must be >= 2 with "
            "--no-contrast-answers "
            "(the reward model learns from pairs of answers to one instruction)"
        )
    check_settings(cfg, more=problems)


def check_sandbox_runs(cfg):
    """One snippet that must run, run in the sandbox before any stage: a sandbox whose interpreter
    cannot start (the project where the snippet's user cannot read it, a broken venv) is found
    now, not at the evaluation after the hours of training."""
    if cfg.exec_mode == "none" or (sandbox.isolation_available() and not cfg.unsafe_exec):
        return  # nothing to run, or check_ready has said why not
    box = evaluate.make_sandbox(cfg.exec_mode, cfg.exec_timeout, cfg.unsafe_exec)
    try:
        verdict, detail = box.run("import json\nprint(json.dumps([1]))", box.spec(APIDatabase()))
    except sandbox.SandboxError as e:
        raise SystemExit(f"rlaif.py: cannot start: the sandbox cannot run code here: {e}") from None
    if verdict != "executable":
        raise SystemExit(
            f"rlaif.py: cannot start: the sandbox rated `print(json.dumps([1]))` {verdict} "
            f"({detail}); see docs/reliability.md"
        )


def context_length(cfg):
    """The longest sequence (prompt + answer) the model of --init takes, or None if unknown before
    loading."""
    if cfg.init in CPU_PRESETS:
        return preset_config(cfg.init).block_size
    try:
        return int(json.loads((Path(cfg.init) / "config.json").read_text())["n_positions"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1024 if cfg.init in GPT2_PARAMS else None  # every GPT-2 on the Hub


def check_answer_room(cfg, splits):
    """--max-answer-tokens leaves room for the longest prompt in the model's context (SFT's examples
    are whole prompt + answer sequences)."""
    block = context_length(cfg)
    if block is None:
        return
    tok = prepare.tokenizer(cfg.compact)
    records = sft.training_records(cfg, [r for split in splits.values() for r in split])
    longest = max(len(prepare.prompt_ids(tok, r.instruction)) for r in records)
    # the reward model reads a tool report after the answer
    report = reward.REPORT_TOKENS if cfg.rm.tools else 0
    if cfg.max_answer_tokens > block - longest - report:
        raise SystemExit(
            f"refused before anything ran:\n  --max-answer-tokens {cfg.max_answer_tokens}: must be "
            f"<= {block - longest - report} (the longest prompt has {longest} tokens, the model's "
            f"context {block}" + (f", the reward model's tool report {report})" if report else ")")
        )


def check_stage_inputs(cfg, splits):
    """The reward model has prompts to train on: what is left of the sampled instructions once its
    held-out and validation prompts are taken (reward.split_prompts itself, on one stand-in row per
    instruction). config.COMBINATIONS checks the fractions alone; this, with the number of
    instructions there are."""
    n = min(cfg.sampled_instructions, len(splits["train"]))
    held, val, _ = reward.split_prompts([SimpleNamespace(record=i) for i in range(n)], cfg.rm, 0)
    if n - len(held) - len(val) < 1:
        raise SystemExit(
            f"refused before anything ran:\n  --sampled-instructions {cfg.sampled_instructions}, "
            f"{setting_label('rm', 'heldout_fraction', cfg.rm.heldout_fraction)}, "
            f"{setting_label('rm', 'val_fraction', cfg.rm.val_fraction)}: of the {n} instructions "
            f"sampled, {len(held)} are held out and {len(val)} validate, leaving the reward model "
            "none to train on; sample more instructions or lower the fractions"
        )


def check_run_dir(cfg, from_stage, until):
    """--run-dir, --from and --until make sense together, before any work: the run directory is a
    directory (or not there yet), --from comes no later than --until, and the stages before --from
    are done (--from redoes a stage from its inputs; it cannot start a run)."""
    run, names, problems = Path(cfg.run_dir), list(STAGES), []
    if run.exists() and not run.is_dir():
        problems.append(
            f"--run-dir {run}: is a file; a run directory is a directory (new or a run's)"
        )
    if from_stage and names.index(from_stage) > names.index(until):
        problems.append(
            f"--from {from_stage} --until {until}: {from_stage} comes after {until} "
            f"(the order: {', '.join(names)}), so no stage would run"
        )
    elif from_stage and not problems:
        earlier = names[: names.index(from_stage)]
        missing = [s for s in earlier if not (run / s / "done.json").exists()]
        if missing:
            problems.append(
                f"--from {from_stage}: the earlier stage(s) {', '.join(missing)} are not done in "
                f"{run}; run them first (python rlaif.py --run-dir {run} --until {earlier[-1]}) "
                f"or start from --from {missing[0]}"
            )
    if problems:
        raise SystemExit("rlaif.py: cannot start:\n  " + "\n  ".join(problems))


def prepare_run_dir(cfg, from_stage):
    """Check the run directory against the requested settings; with --from, set aside the stages to
    redo (run_dir/.previous/<stage>) until the new ones are complete."""
    run = Path(cfg.run_dir)
    config_file = run / "config.json"
    if config_file.exists() and not from_stage:
        # Read as this version reads it: a setting the run did not record (made before the setting
        # existed) is at its default, so that a run of an older version still resumes.
        diff = settings_diff(asdict(load_config(run, **SECTION_CLASSES)), cfg)
        if diff:
            raise SystemExit(
                f"rlaif.py: {run} was run with other settings:\n  "
                + "\n  ".join(diff)
                + "\nUse a new --run-dir, or --from STAGE to redo from a stage with the new "
                "settings."
            )
    if is_main():  # under torchrun, rank 0 alone touches the files
        if from_stage:
            set_aside(run, STAGE_ORDER[STAGE_ORDER.index(from_stage) :])
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run)
    barrier()
    return run


def run_pipeline(cfg, from_stage=None, until="evaluate"):
    refuse_bad_settings(cfg)
    check_ready(cfg)
    if until == "evaluate":
        check_sandbox_runs(cfg)
    # a bad train file is refused before the run starts
    splits = prepare.run_splits(cfg, log=log)
    check_answer_room(cfg, splits)
    check_stage_inputs(cfg, splits)
    run = prepare_run_dir(cfg, from_stage)
    judge = (
        "RULES JUDGE (offline stand-in, not an LLM)" if cfg.judge == "rules" else cfg.judge_model
    )
    log(
        f"[rlaif] run {run}: model {cfg.init} "
        f"({'trained from scratch' if cfg.init in CPU_PRESETS else 'HF weights'}), judge "
        f"{judge}, device {cfg.device}"
    )
    if cfg.tensorboard and is_main():
        open_tensorboard(run / "tb")
        log(f"[rlaif] TensorBoard: tensorboard --logdir {run / 'tb'}")
    log_host_rate(cfg)
    names = list(STAGES)
    for stage in names[: names.index(until) + 1]:
        if (run / stage / "done.json").exists():
            verify_done(run / stage)
            log(f"[{stage}] already done ({run / stage / 'done.json'}), skipped")
            continue
        run_stage(cfg, run, stage, STAGES[stage], splits)
    if until == "evaluate" and is_main():
        print_results(cfg, run)
        if importlib.util.find_spec("matplotlib"):
            evaluate.plot_runs([run])
            log(f"  -> {run / 'evaluate' / 'curves.png'}, {run / 'evaluate' / 'results.png'}")
        else:
            log("  (no plots: pip install matplotlib, then python evaluate.py --plot RUN_DIR)")


def print_results(cfg, run):
    done = json.loads((run / "evaluate" / "done.json").read_text())
    judge = (
        "RULES JUDGE (offline deterministic stand-in for GPT-3.5; not LLM feedback)"
        if cfg.judge == "rules"
        else f"LLM judge {cfg.judge_model}"
    )
    model = (
        f"{cfg.init} GPT-2 architecture trained FROM SCRATCH (not GPT-2 weights)"
        if cfg.init in CPU_PRESETS
        else f"{cfg.init} from Hugging Face weights"
    )
    split = (
        f"trained on {cfg.train_file}" if cfg.train_file else "offline hash split of the eval file"
    )
    log(f"\nResults on {next(iter(done['results'].values()))['n']} held-out questions ({split})")
    log(f"  model: {model}\n  judge: {judge}\n  executability: {cfg.exec_mode} mode\n")
    log(evaluate.results_table(done["results"]))
    for name, s in done["results"].items():
        if "exec_failures" in s:
            log(f"  {name}: non-executable by class {s['exec_failures']}")
    log(f"\n  -> {run / 'evaluate' / 'results.md'}")


# -----------------------------------------------------------------------------
# Command line: a flag per pipeline setting and per section setting of config.DRIVER_FLAGS
# (--sft-steps, --ppo-lr), --set SECTION.NAME=VALUE for the others


def tiny_and_paper_defaults(prefix):
    paper = PAPER.get(prefix.rstrip("-"), {}) if prefix else PAPER

    def text(f):  # an empty default shows as '', not as nothing
        shown = repr(f.default) if f.default == "" else f"{f.default}"
        return shown + (f"; paper: {paper[f.name]}" if f.name in paper else "")

    return text


def set_help():
    """--set's help: how, and the section settings without a flag of their own (their defaults)."""
    others = "; ".join(
        f"{section}: "
        + ", ".join(
            f"{f.name}={str(f.default).lower() if isinstance(f.default, bool) else f.default}"
            + (f" (paper: {PAPER[section][f.name]})" if f.name in PAPER.get(section, {}) else "")
            for f in fields(cls)
            if f.name not in DRIVER_FLAGS[section]
        )
        for section, cls in SECTION_CLASSES.items()
    )
    return (
        "a setting of a section by its name (repeatable; yes/no: true or false), e.g. --set "
        f"ppo.gamma=0.99. The section settings without a flag below, at their defaults: {others}. "
        "What each means and its range: the section's class (sft.SFTConfig, ppo.PPOConfig, "
        "reward.RMConfig, dpo.DPOConfig) or python sft.py / ppo.py / reward.py / dpo.py --help"
    )


def parse_args(argv=None):
    """(config, --from, --until) from the command line."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        choices=sorted(PRESETS),
        help="preset: tiny (offline, CPU; the default) or paper (gpt2-large, GPT-3.5 judge, one "
        "GPU). "
        "Without it and without settings, an existing --run-dir resumes with its recorded settings",
    )
    p.add_argument(
        "--from",
        dest="from_stage",
        choices=list(STAGES),
        help="redo this stage and every later one",
    )
    p.add_argument(
        "--until", choices=list(STAGES), default="evaluate", help="stop after this stage"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (stages, sizes, the judge's requests and "
        "estimated cost, device) and exit: nothing runs, nothing is written, no network",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.NAME=VALUE", help=set_help()
    )
    for name, cls in dict(pipeline=Config, **SECTION_CLASSES).items():
        prefix = "" if cls is Config else name + "-"
        add_flags(p, cls, prefix, tiny_and_paper_defaults(prefix), DRIVER_FLAGS.get(name))
    args = vars(p.parse_args(argv))
    preset, from_stage, until, dry_run, assignments = (
        args.pop("config"),
        args.pop("from_stage"),
        args.pop("until"),
        args.pop("dry_run"),
        args.pop("set"),
    )
    flags = {k: v for k, v in args.items() if v is not None}
    overrides = set_overrides(assignments, SECTION_CLASSES, flags)
    cfg = make_config(preset or "tiny", **overrides)
    # an existing run: its settings + flags
    if preset is None and (Path(cfg.run_dir) / "config.json").exists():
        cfg = apply_overrides(load_config(cfg.run_dir, **SECTION_CLASSES), overrides)
    cfg.dry_run = dry_run  # not a setting of the run (asdict leaves it out): how this command runs
    return cfg, from_stage, until


GPT2_PARAMS = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}


def log_host_rate(cfg):
    """This host's torch.mm rate at the shapes of the run's model (model.matmul_rate): the
    yardstick of every stage's MFU (done.json), printed so that a wall time reads beside it."""
    if cfg.init not in MODEL_PRESETS:
        return  # a local directory: its shapes are read when it loads
    config = preset_config(cfg.init, prepare.tokenizer(cfg.compact).vocab_size)
    rate = matmul_rate(config, cfg.device) / 1e9
    log(
        f"[rlaif] host: torch.mm {rate:.0f} GFLOP/s at {cfg.init}'s shapes, "
        f"{torch.get_num_threads()} threads"
    )


def model_size(cfg):
    """'6.2M' for a preset trained from scratch, the published size of a GPT-2 on the Hub."""
    if cfg.init in CPU_PRESETS:
        net = GPT(preset_config(cfg.init, prepare.tokenizer(cfg.compact).vocab_size))
        return f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M"
    return GPT2_PARAMS.get(cfg.init, "size read from its config.json")


def judge_plan_text(cfg, train, n_answers):
    """The judge's requests and estimated cost for n_answers answers (--judge openai)."""
    if cfg.judge != "openai":
        return "rules judge (free)"
    proxy = [
        Sample(
            i,
            i % len(train),
            "reference",
            [],
            [],
            prepare.format_answer(train[i % len(train)].sections, cfg.compact),
        )
        for i in range(n_answers)
    ]  # reference answers stand in for the answers not yet sampled
    price = judge_price(cfg.judge_model, cfg.judge_price)
    plan = judge_plan(cfg.judge_model, proxy, train, APIDatabase(), price)
    return f"{cfg.judge_model}: " + plan_text(cfg.judge_model, *plan)


def plan_lines(cfg, splits):
    """One line per stage: what it would do with these settings."""
    train = splits["train"]
    # the Hub's train file is not read offline: its instructions (thousands) are assumed enough
    hub = cfg.train_file == prepare.HUB_TRAIN
    n_prompts = cfg.sampled_instructions if hub else min(cfg.sampled_instructions, len(train))
    n_answers = n_prompts * (cfg.answers_per_instruction + (3 if cfg.contrast_answers else 0))
    cap = f", capped at ${cfg.judge_max_usd}" if cfg.judge_max_usd else ""
    judge = judge_plan_text(cfg, train, n_answers)
    rollouts = cfg.ppo.iterations * cfg.ppo.batch_size
    compare = (
        f"d-RLAIF, RLOO and GRPO ({cfg.ppo.iterations} x {cfg.ppo.batch_size} rollouts each; "
        f"d-RLAIF asks the judge {rollouts * len(QUESTIONS):,} questions), "
        f"DPO {cfg.dpo.steps} steps, rejection sampling, best-of-{cfg.best_of_n}"
    )
    return dict(
        sft=f"{cfg.sft.steps} steps x {cfg.sft.batch_size * cfg.sft.grad_accum} examples of "
        f"{'the Hub train split' if hub else f'{len(train)} instructions'}"
        f"{' + 936 API-database pairs' if cfg.api_pairs else ''}",
        sample=f"{n_prompts} instructions x {cfg.answers_per_instruction} answers at "
        f"T={cfg.temperature}{' + 3 contrast answers each' if cfg.contrast_answers else ''}",
        feedback=f"{n_answers} answers x {len(QUESTIONS)} questions; {judge}{cap}",
        reward=f"{cfg.rm.epochs} epoch(s) of judge-ordered pairs, {cfg.rm.batch_size} per step",
        ppo=f"{cfg.ppo.iterations} iterations x {cfg.ppo.batch_size} rollouts of up to "
        f"{cfg.max_answer_tokens} tokens ({cfg.ppo.rollouts_per_prompt} per prompt)",
        compare=compare if cfg.compare else "skipped",
        evaluate=f"{len(evaluate.eval_questions(cfg, splits))} {cfg.eval_split} questions, "
        f"executability {cfg.exec_mode}",
    )


def print_plan(cfg, until):
    """--dry-run: what `python rlaif.py` with these settings would do, offline and without
    writing."""
    names = list(STAGES)[: list(STAGES).index(until) + 1]
    hub = cfg.train_file == prepare.HUB_TRAIN
    splits = prepare.load_splits(
        "" if hub else cfg.train_file, cfg.val_percent, log=lambda *a: None
    )
    lines = plan_lines(cfg, splits)
    log(
        f"[dry run] {cfg.run_dir}: {cfg.init} ({model_size(cfg)} parameters), device {cfg.device}; "
        "nothing is run"
        + (
            f" (the Hub's train file is not read: {cfg.sampled_instructions} of its instructions"
            " assumed; other sizes are the offline split's)"
            if hub
            else ""
        )
    )
    for name in names:
        log(f"  {name:9s} {lines[name]}")


def main(argv=None):
    cfg, from_stage, until = parse_args(argv)
    check_run_dir(cfg, from_stage, until)
    if cfg.dry_run:
        refuse_bad_settings(cfg)
        return print_plan(cfg, until)
    t0 = time.time()
    keep_freed_memory()
    setup_distributed(cfg.device, cfg.dist_timeout)
    with os_errors_as_messages("[rlaif]"):  # a full disk, a permission: one line, exit 1
        run_pipeline(cfg, from_stage, until)
    log(f"\n[rlaif] total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
