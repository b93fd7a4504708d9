"""
RLAIF for code generation with API usage (Dutta et al. 2024, arXiv 2406.20060), end to end.

    python rlaif.py                  # offline default: tiny GPT-2 from scratch, rules judge, CPU
    python rlaif.py --config paper   # gpt2-large from HF weights, GPT-3.5 judge, one GPU, online

The paper's method, one stage each, in order. Every stage reads its inputs from --run-dir, writes its
outputs under run_dir/<stage>/ and a done.json (summary + hashes of its outputs); a finished stage is
skipped on the next run, so an interrupted run resumes where it stopped.
  1. data      the Gorilla APIBench HuggingFace split                       data/gorilla/prepare.py
  2. sft       supervised fine-tuning on (instruction -> answer)            sft_stage below
  3. sample    answers to the training instructions from the SFT policy     sample_stage, model.sample_answers
  4. feedback  AI feedback: yes/no questions to a judge -> score in [0,1]   feedback_stage, reward.judge_answers
  5. reward    reward model trained on the judge's scores                   reward.reward_stage
  6. ppo       PPO against the reward model, KL penalty to SFT              ppo.ppo_stage
  7. compare   [not in the paper, --compare] the same feedback used four     compare_stage below, dpo.py
               more ways: d-RLAIF (PPO on the judge's score), RLOO, DPO, best-of-n
  8. evaluate  SFT vs RLAIF (vs those) vs Gorilla-7B on held-out questions  evaluate.evaluate_stage
Results land in run_dir/evaluate/results.md (and results in its done.json).
"""
import argparse
import importlib.util
import json
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import torch

import dpo
import evaluate
import ppo
import reward
import sandbox
from data.gorilla import prepare
from model import (GPT, RUN_FILES, STAGE_ORDER, ScalarModel, Tokenizer, add_flags, atomic_write, autocast, length_grouped_batches,
                   log, lr_at, make_optimizer, mark_done, pad_pairs, preset_config, progress, read_jsonl, response_logprobs, resume, sample_answers,
                   open_tensorboard, save_checkpoint, set_aside, verify_done, write_jsonl, write_metrics)
from dpo import DPOConfig
from ppo import PPOConfig
from reward import RMConfig

CODE_TAG = "<<<code>>>:"
CPU_PRESETS = ("tiny", "micro")  # model presets trained from scratch (no GPT-2 weights offline)


@dataclass
class Config:
    """Every knob of the pipeline, defaults = the embedded tiny run; PAPER below lists what differs.
    Each field is a command-line flag (--sft-steps); PPO and reward-model knobs are --ppo-* and --rm-*."""
    run_dir: Annotated[str, "where every stage writes its outputs"] = "runs/tiny"
    seed: Annotated[int, "seed of every stage (split order, initialisation, sampling, PPO)"] = 1
    device: Annotated[str, "cpu, cuda or cuda:N"] = "cpu"
    init: Annotated[str, "model preset trained from scratch (tiny, micro) or HF weights to start from "
                         "(gpt2-large, or a directory with config.json + model.safetensors)"] = "tiny"
    compact: Annotated[bool, "[offline stand-in] compact vocabulary + compact answers (no explanation, "
                             "code cut after the api_call)"] = True
    api_pairs: Annotated[bool, "[offline stand-in] add the API database's 925 APIs as SFT pairs"] = True
    train_file: Annotated[str, "SFT data: '' = the offline split of the eval file; hub = APIBench's "
                               "huggingface_train.json from the Hub; or a local file of its schema"] = ""
    max_answer_tokens: Annotated[int, "answer length: SFT targets are cut to it; sampling, PPO rollouts and "
                                      "evaluation stop at it"] = 160
    sft_steps: Annotated[int, "SFT optimizer steps"] = 800
    sft_batch_size: Annotated[int, "SFT examples per micro-batch"] = 16
    sft_grad_accum: Annotated[int, "SFT micro-batches per optimizer step"] = 1
    sft_lr: Annotated[float, "SFT peak learning rate (linear warmup, cosine decay)"] = 2e-3
    sft_warmup: Annotated[int, "SFT warmup steps"] = 50
    weight_decay: Annotated[float, "AdamW weight decay on matrices (SFT)"] = 0.1
    grad_clip: Annotated[float, "gradient-norm clip (SFT, reward model, PPO)"] = 1.0
    eval_every: Annotated[int, "SFT validation loss and checkpoint every this many steps"] = 100
    samples_per_prompt: Annotated[int, "answers sampled per instruction for AI feedback"] = 4
    sample_prompts: Annotated[int, "training instructions that get sampled answers (at most all)"] = 1000
    contrast_answers: Annotated[bool, "[not in the paper] also judge, per sampled instruction, its reference, "
                                      "another domain's, and a policy answer cut before its code"] = True
    temperature: Annotated[float, "sampling temperature of the feedback samples and the PPO rollouts"] = 0.7
    judge: Annotated[str, "rules (offline stand-in) or openai (any OpenAI-compatible LLM, the paper's "
                          "GPT-3.5)", ("rules", "openai")] = "rules"
    judge_model: Annotated[str, "model name sent to the judge endpoint"] = "gpt-3.5-turbo"
    judge_base_url: Annotated[str, "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 for vLLM "
                                   "(empty: $OPENAI_BASE_URL, else api.openai.com)"] = ""
    judge_concurrency: Annotated[int, "judge requests in flight"] = 8
    tensorboard: Annotated[bool, "also write every stage's metrics and PPO's sample tables as TensorBoard event "
                                 "files in run_dir/tb (needs: pip install tensorboard)"] = False
    judge_max_usd: Annotated[float, "stop the AI feedback before the judge's estimated or running cost passes "
                                    "this many USD (0 = no cap); what was judged is kept"] = 0.0
    eval_limit: Annotated[int, "evaluate on the first N held-out questions only (0 = all)"] = 0
    exec_mode: Annotated[str, "executability: offline (checking stand-ins, no network), real (real "
                              "libraries) or none", ("offline", "real", "none")] = "offline"
    exec_timeout: Annotated[float, "seconds per snippet (real mode includes model downloads)"] = 10.0
    unsafe_exec: Annotated[bool, "offline executability without OS isolation where namespaces are "
                                 "unavailable (NOT isolated; marked in the results)"] = False
    compare: Annotated[bool, "[not in the paper] also d-RLAIF (PPO on the judge's score), DPO and best-of-n "
                             "from the same SFT model and feedback, in the same results table"] = False
    best_of_n: Annotated[int, "answers sampled per test question for --compare's best-of-n"] = 8
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


# The paper's configuration (section 4): only what differs from the tiny defaults.
PAPER = dict(run_dir="runs/paper", device="cuda", init="gpt2-large", compact=False, api_pairs=False,
             train_file=prepare.HUB_TRAIN, max_answer_tokens=512, sft_steps=3000, sft_batch_size=8, sft_grad_accum=4,
             sft_lr=5e-5, sft_warmup=100, eval_every=250, sample_prompts=2000, temperature=1.0,
             contrast_answers=False, judge="openai", exec_mode="real", exec_timeout=300.0,
             ppo=dict(iterations=200, batch_size=64, minibatch_size=8, grad_accum=2, epochs=4, lr=1e-5),
             rm=dict(lr=1e-5, batch_size=8))
PRESETS = {"tiny": {}, "paper": PAPER}


def make_config(preset="tiny", **overrides):
    """Config of a preset with overrides: top-level names, ppo_<name> / rm_<name>, or ppo=dict(...)."""
    cfg = Config()
    for source in (PRESETS[preset], overrides):
        for key, value in source.items():
            if value is None:
                continue
            if key in ("ppo", "rm", "dpo"):
                setattr(cfg, key, replace(getattr(cfg, key), **value))
            elif key.startswith(("ppo_", "rm_", "dpo_")):
                sub, name = key.split("_", 1)
                setattr(cfg, sub, replace(getattr(cfg, sub), **{name: value}))
            else:
                setattr(cfg, key, value)
    return cfg


def tokenizer_for(cfg):
    return Tokenizer(prepare.VOCAB_FILE if cfg.compact else None)


# -----------------------------------------------------------------------------
# 2. SFT

def init_model(cfg, tok):
    if cfg.init in CPU_PRESETS:
        return GPT(preset_config(cfg.init, tok.vocab_size))
    return GPT.from_pretrained(cfg.init)  # HF weights: a local directory or a Hub name


def sft_examples(cfg, tok, records):
    """(prompt ids, answer ids ending in <|endoftext|>): the one prompt/answer format."""
    return [(prepare.prompt_ids(tok, r.instruction),
             prepare.answer_ids(tok, r.sections, cfg.compact, cfg.max_answer_tokens)) for r in records]


def sft_loss(model, examples, pad, device):
    """Mean negative log-likelihood of the answer tokens; prompt tokens carry no loss."""
    query, query_mask, response, response_mask = pad_pairs(examples, pad, device)
    with autocast(device):
        logprobs = response_logprobs(model, query, query_mask, response, response_mask)
    return -logprobs.sum() / response_mask.sum(), int(query_mask.sum() + response_mask.sum())


@torch.no_grad()
def validation_loss(model, examples, pad, device, batch_size=32):
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        loss, _ = sft_loss(model, chunk, pad, device)
        tokens = sum(len(a) for _, a in chunk)
        total, n = total + loss.item() * tokens, n + tokens
    model.train()
    return total / max(n, 1)


def batch_at(examples, batch_size, index, seed):
    """The index-th batch of SFT: epochs of batches grouped by total length (model.length_grouped_batches).
    A pure function of (index, seed): a resumed run sees exactly the batches of an uninterrupted one."""
    per_epoch = max(1, len(examples) // batch_size)
    epoch, i = divmod(index, per_epoch)
    keys = [len(q) + len(a) for q, a in examples]
    batches = length_grouped_batches(keys, batch_size, seed * 1_000_003 + epoch, seed * 7 + epoch, drop_last=True)
    return [examples[j] for j in batches[i]]


def sft(cfg, tok, train, val, out_dir):
    """Supervised fine-tuning on answer tokens, resumable from its last checkpoint."""
    out_dir = Path(out_dir)
    ckpt_file = out_dir / "ckpt.pt"
    torch.manual_seed(cfg.seed)
    model = init_model(cfg, tok).to(cfg.device)
    optimizer = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
    step, history = 0, []
    ckpt = resume(ckpt_file, cfg.device, optimizer, model=model)
    if ckpt:
        step, history = ckpt["step"], ckpt["history"]
        log(f"[sft] resumed from {ckpt_file} at step {step}")
    model.train()
    t0, tokens_seen, start = time.time(), 0, step
    while step < cfg.sft_steps:
        lr = lr_at(step, cfg.sft_lr, cfg.sft_warmup, cfg.sft_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.sft_grad_accum):
            batch = batch_at(train, cfg.sft_batch_size, step * cfg.sft_grad_accum + micro, cfg.seed)
            loss, n_tokens = sft_loss(model, batch, tok.eot, cfg.device)
            (loss / cfg.sft_grad_accum).backward()
            tokens_seen += n_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(dict(step=step, loss=round(loss.item(), 4), lr=lr,
                            tokens_per_s=round(tokens_seen / (time.time() - t0))))
        if step % 25 == 0 or step == cfg.sft_steps:
            log(f"[sft] step {step}/{cfg.sft_steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"{history[-1]['tokens_per_s']:,} tok/s {progress(step - start, cfg.sft_steps - start, t0)}")
        if step % cfg.eval_every == 0 or step == cfg.sft_steps:
            history[-1]["val_loss"] = round(validation_loss(model, val, tok.eot, cfg.device), 4)
            log(f"[sft] step {step} val loss {history[-1]['val_loss']:.3f}")
            save_checkpoint(ckpt_file, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, history=history)
            write_metrics(out_dir / "metrics.jsonl", history)  # from the checkpointed history: resumable
    model.eval()
    return model, history


def sft_stage(cfg, run, splits):
    tok = tokenizer_for(cfg)
    extra = prepare.api_database_pairs(prepare.load_api_database()) if cfg.api_pairs else []
    train = sft_examples(cfg, tok, splits["train"] + extra)
    model, history = sft(cfg, tok, train, sft_examples(cfg, tok, splits["val"]), run / "sft")
    model.save_pretrained(run / RUN_FILES["sft_model"], eot=tok.eot)
    return dict(train_examples=len(train), final_loss=history[-1]["loss"],
                val_loss=[h["val_loss"] for h in history if "val_loss" in h][-1])


# -----------------------------------------------------------------------------
# 3. Sample answers from the SFT policy

def sample_stage(cfg, run, splits):
    """samples_per_prompt answers to the first sample_prompts training instructions (a seeded shuffle)."""
    tok, train = tokenizer_for(cfg), splits["train"]
    order = list(range(len(train)))
    random.Random(cfg.seed).shuffle(order)
    chosen = order[:cfg.sample_prompts]
    prompts = [prepare.prompt_ids(tok, train[i].instruction) for i in chosen for _ in range(cfg.samples_per_prompt)]
    model = GPT.from_pretrained(run / RUN_FILES["sft_model"]).to(cfg.device)
    responses = sample_answers(model, prompts, tok.eot, cfg.max_answer_tokens, cfg.temperature, cfg.seed, log=log)
    samples = [dict(id=k, record=chosen[k // cfg.samples_per_prompt], source="policy", query=q, response=r,
                    answer=tok.decode(r)) for k, (q, r) in enumerate(zip(prompts, responses))]
    if cfg.contrast_answers:
        samples += contrast_answers(cfg, tok, train, chosen, samples, start_id=len(samples))
    write_jsonl(run / RUN_FILES["samples"], samples)
    return dict(samples=len(samples))


def contrast_answers(cfg, tok, train, chosen, samples, start_id):
    """[not in the paper] For each sampled instruction, three more answers for the judge to score: its
    reference answer; the reference of an instruction from another domain; and one of the policy's own
    answers to it with the code section cut off. Policy samples to one instruction rarely differ in
    relevance and almost never lack code, so without these the reward model had no pairs that teach
    either (docs/experiments.md). Each pair of these differs in exactly one of the two properties."""
    rng = random.Random(cfg.seed + 1)
    domains = [r.api_data.get("domain") for r in train]
    elsewhere = {d: [j for j, e in enumerate(domains) if e != d] for d in set(domains)}
    with_code = {}
    for s in samples:
        if s["record"] not in with_code and prepare.parse_answer(s["answer"])["code"] and CODE_TAG in s["answer"]:
            with_code[s["record"]] = s
    out = []
    for i in chosen:
        other = rng.choice(elsewhere[domains[i]])
        query = prepare.prompt_ids(tok, train[i].instruction)
        answers = [("reference", prepare.answer_ids(tok, train[i].sections, cfg.compact, cfg.max_answer_tokens)),
                   ("mismatched", prepare.answer_ids(tok, train[other].sections, cfg.compact, cfg.max_answer_tokens))]
        if i in with_code:
            policy = with_code[i]["answer"]
            answers.append(("no_code", tok.encode(policy[:policy.index(CODE_TAG) + len(CODE_TAG)]) + [tok.eot]))
        for source, response in answers:
            out.append(dict(id=start_id + len(out), record=i, source=source, query=query, response=response,
                            answer=tok.decode(response)))
    return out


# -----------------------------------------------------------------------------
# 4. AI feedback

def feedback_stage(cfg, run, splits):
    judge = reward.make_judge(cfg.judge, cfg.judge_model, cfg.judge_base_url, cfg.judge_concurrency,
                              cache_file=run / RUN_FILES["judge_cache"], max_usd=cfg.judge_max_usd, log=log)
    samples, partial = read_jsonl(run / RUN_FILES["samples"]), run / "feedback" / "feedback.partial.jsonl"
    if cfg.judge == "rules":
        log("[feedback] NOTE: the RULES JUDGE (deterministic checks) stands in for the paper's GPT-3.5 judge; "
            "this is not LLM feedback. Use --judge openai for AI feedback.")
    else:  # what the judge will cost, before the first paid request
        judged = reward.judged_so_far(partial)
        plan = reward.judge_plan(cfg.judge_model, [s for s in samples if s["id"] not in judged], splits["train"],
                                 judge.db)
        log(f"[feedback] judge {cfg.judge_model}: {reward.plan_text(cfg.judge_model, *plan)} (cached answers free)")
        if cfg.judge_max_usd and plan[3] is not None and plan[3] > cfg.judge_max_usd:
            raise SystemExit(f"[feedback] the estimate passes --judge-max-usd {cfg.judge_max_usd}: nothing was sent. "
                             "Raise the cap, or judge fewer answers (--sample-prompts, --samples-per-prompt).")
    try:
        feedback = reward.judge_answers(judge, samples, splits["train"], partial,
                                        cfg.judge_concurrency if cfg.judge == "openai" else 1, log=log)
    except reward.JudgeBudgetExceeded as e:
        raise SystemExit(f"[feedback] stopped: {e}. Every answer so far is kept ({partial}, "
                         f"{RUN_FILES['judge_cache']}); rerun with a higher --judge-max-usd to resume.") from None
    for source in sorted({f["source"] for f in feedback}):
        fb = [f for f in feedback if f["source"] == source]
        scores = [f["score"] for f in fb if f["score"] is not None]
        log(f"[feedback] {source} answers: mean score {sum(scores) / max(1, len(scores)):.3f} over {len(scores)}; "
            "P(yes) per question: " + ", ".join(f"{k} {sum(f['answers'][k] or 0 for f in fb) / len(fb):.2f}"
                                                for k, _, _ in reward.QUESTIONS))
    write_jsonl(run / RUN_FILES["feedback"], feedback)
    return dict(judge=judge.name, judged=sum(f["score"] is not None for f in feedback))


# -----------------------------------------------------------------------------
# 7. [not in the paper] The same feedback used three more ways, for one table (--compare)

def compare_stage(cfg, run, splits):
    """From the same SFT model and the same AI feedback as the paper's PPO: d-RLAIF (the same PPO with the
    judge's score as the reward), RLOO (the same rollouts and reward model, no critic), DPO on the judge-ordered pairs, and best-of-n on the test questions
    (n samples each, picked by the reward model, and by the judge itself for reference)."""
    if not cfg.compare:
        return dict(skipped="--compare not given")
    out, tok = run / "compare", tokenizer_for(cfg)
    feedback = read_jsonl(run / RUN_FILES["feedback"])
    judge = reward.make_judge(cfg.judge, cfg.judge_model, cfg.judge_base_url, cfg.judge_concurrency,
                              cache_file=run / RUN_FILES["judge_cache"], max_usd=cfg.judge_max_usd, log=log)
    if not (out / "drlaif" / "model" / "config.json").exists():
        log("[compare] d-RLAIF: PPO with the judge's score as the reward")
        ppo.ppo_stage(cfg, run, splits, reward.judge_score_fn(judge, splits["train"], tok, feedback), out / "drlaif")
    if not (out / "rloo" / "model" / "config.json").exists():
        log("[compare] RLOO: the same rollouts and reward model, a leave-one-out baseline instead of the critic")
        ppo.ppo_stage(cfg, run, splits, out_dir=out / "rloo", advantage="rloo")
    if not (out / "dpo" / "model" / "config.json").exists():
        pairs = reward.make_pairs(feedback, cfg.rm.max_contrast_pairs, random.Random(cfg.seed))
        dpo.dpo_model(cfg, run, pairs, out / "dpo")
    test = splits["test"][:cfg.eval_limit or None]
    prompts = [prepare.prompt_ids(tok, r.instruction) for r in test for _ in range(cfg.best_of_n)]
    model = GPT.from_pretrained(run / RUN_FILES["sft_model"]).to(cfg.device)
    log(f"[compare] best-of-{cfg.best_of_n}: {len(prompts)} samples of the SFT model on the test questions")
    responses = sample_answers(model, prompts, tok.eot, cfg.max_answer_tokens, cfg.temperature, cfg.seed, log=log)
    samples = {i: dict(query=q, response=r) for i, (q, r) in enumerate(zip(prompts, responses))}
    rm, _ = ScalarModel.load(run / RUN_FILES["reward_model"], cfg.device)
    rm_score = reward.rm_scores(rm, samples, list(samples), tok, cfg.device).tolist()
    answers = [tok.decode(r) for r in responses]
    judge_score = [reward.combine(judge.answers(test[i // cfg.best_of_n], a)) or 0.0 for i, a in enumerate(answers)]
    for name, scores in (("rm", rm_score), ("judge", judge_score)):
        write_jsonl(out / f"best_of_n_{name}.jsonl", [dict(question_id=r.line, text=answers[j])
                                                     for r, j in zip(test, reward.best_of_n(scores, cfg.best_of_n))])
    return dict(best_of_n=cfg.best_of_n)


# -----------------------------------------------------------------------------
# The driver: the stages in order, each skipped when its done.json exists and its outputs are intact

STAGES = dict(zip(STAGE_ORDER, (sft_stage, sample_stage, feedback_stage, reward.reward_stage, ppo.ppo_stage,
                                compare_stage, evaluate.evaluate_stage)))
# Settings that change no result (where and how fast, not what): a finished run may be resumed with others.
NOT_RESULTS = ("run_dir", "judge_concurrency", "judge_max_usd", "tensorboard")


def settings_diff(recorded, cfg):
    """['field: recorded -> requested', ...] between a run's config.json and the requested config."""
    wanted = asdict(cfg)
    diff = []
    for key in sorted(set(recorded) | set(wanted)):
        if key in NOT_RESULTS:
            continue
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diff += [f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k)]
        elif old != new:
            diff.append(f"{key}: {old!r} -> {new!r}")
    return diff


def reachable(host, port=443, timeout=3.0):
    import socket
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_ready(cfg):
    """Everything that can be known before any stage runs, so a run never fails after hours of work."""
    problems = []
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        problems.append(f"--device {cfg.device!r}: use cpu, cuda or cuda:N")
    elif cfg.device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {cfg.device}: no CUDA GPU is visible to torch here; use --device cpu")
    if cfg.init not in CPU_PRESETS and not Path(cfg.init).is_dir() and not reachable("huggingface.co"):
        problems.append(f"--init {cfg.init}: not a local directory, and the Hugging Face Hub is unreachable "
                        "(offline?): pass a directory with config.json + model.safetensors")
    if cfg.train_file == prepare.HUB_TRAIN and not reachable("huggingface.co"):
        problems.append("--train-file hub: the Hugging Face Hub is unreachable (offline?); --train-file '' uses "
                        "the offline split of the eval file, or give a local copy of huggingface_train.json")
    elif cfg.train_file and cfg.train_file != prepare.HUB_TRAIN and not Path(cfg.train_file).is_file():
        problems.append(f"--train-file {cfg.train_file}: no such file")
    if cfg.judge == "openai":
        problems += reward.judge_problems(cfg.judge_base_url)
    if cfg.exec_mode != "none":
        reason = sandbox.isolation_available()
        if reason and (cfg.exec_mode == "real" or not cfg.unsafe_exec):
            problems.append(f"--exec-mode {cfg.exec_mode}: OS-level isolation is unavailable ({reason}); "
                            "generated code is not run without it (offline mode: --unsafe-exec forces it)")
    if cfg.compact and cfg.init not in CPU_PRESETS:
        problems.append(f"--init {cfg.init} has GPT-2's vocabulary; the compact vocabulary is for models trained "
                        "from scratch: add --no-compact")
    if cfg.max_answer_tokens < 8:
        problems.append("--max-answer-tokens must be at least 8")
    if problems:
        raise SystemExit("rlaif.py: cannot start:\n  " + "\n  ".join(problems))


def prepare_run_dir(cfg, from_stage):
    """Check the run directory against the requested settings; with --from, set aside the stages to redo
    (run_dir/.previous/<stage>) until the new ones are complete."""
    run = Path(cfg.run_dir)
    config_file = run / "config.json"
    if config_file.exists() and not from_stage:
        diff = settings_diff(json.loads(config_file.read_text()), cfg)
        if diff:
            raise SystemExit(f"rlaif.py: {run} was run with other settings:\n  " + "\n  ".join(diff) +
                             "\nUse a new --run-dir, or --from STAGE to redo from a stage with the new settings.")
    if from_stage:
        set_aside(run, STAGE_ORDER[STAGE_ORDER.index(from_stage):])
    run.mkdir(parents=True, exist_ok=True)
    atomic_write(config_file, lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=1)))
    return run


def run_pipeline(cfg, from_stage=None, until="evaluate"):
    check_ready(cfg)
    run = prepare_run_dir(cfg, from_stage)
    log(f"[rlaif] run {run}: model {cfg.init} "
        f"({'trained from scratch' if cfg.init in CPU_PRESETS else 'HF weights'}), judge "
        f"{'RULES JUDGE (offline stand-in, not an LLM)' if cfg.judge == 'rules' else cfg.judge_model}, "
        f"device {cfg.device}")
    splits = prepare.load_splits(cfg.train_file, log=log)
    if cfg.tensorboard:
        open_tensorboard(run / "tb")
        log(f"[rlaif] TensorBoard: tensorboard --logdir {run / 'tb'}")
    names = list(STAGES)
    for stage in names[:names.index(until) + 1]:
        if (run / stage / "done.json").exists():
            verify_done(run / stage)
            log(f"[{stage}] already done ({run / stage / 'done.json'}), skipped")
            continue
        t0 = time.time()
        (run / stage).mkdir(parents=True, exist_ok=True)
        summary = STAGES[stage](cfg, run, splits)
        mark_done(run / stage, dict(summary, seconds=round(time.time() - t0, 1)))
        shutil.rmtree(run / ".previous" / stage, ignore_errors=True)  # its new result is complete
        log(f"[{stage}] done in {time.time() - t0:.0f}s -> {run / stage}")
    if (run / ".previous").exists() and not any((run / ".previous").iterdir()):
        (run / ".previous").rmdir()
    if until == "evaluate":
        print_results(cfg, run)
        if importlib.util.find_spec("matplotlib"):
            evaluate.plot_runs([run])
            log(f"  -> {run / 'evaluate' / 'curves.png'}, {run / 'evaluate' / 'results.png'}")
        else:
            log("  (no plots: pip install matplotlib, then python evaluate.py --plot RUN_DIR)")


def print_results(cfg, run):
    done = json.loads((run / "evaluate" / "done.json").read_text())
    judge = ("RULES JUDGE (offline deterministic stand-in for GPT-3.5; not LLM feedback)" if cfg.judge == "rules"
             else f"LLM judge {cfg.judge_model}")
    model = (f"{cfg.init} GPT-2 architecture trained FROM SCRATCH (not GPT-2 weights)" if cfg.init in CPU_PRESETS
             else f"{cfg.init} from Hugging Face weights")
    split = f"trained on {cfg.train_file}" if cfg.train_file else "offline hash split of the eval file"
    log(f"\nResults on {next(iter(done['results'].values()))['n']} held-out questions ({split})")
    log(f"  model: {model}\n  judge: {judge}\n  executability: {cfg.exec_mode} mode\n")
    log(evaluate.results_table(done["results"]))
    for name, s in done["results"].items():
        if "exec_failures" in s:
            log(f"  {name}: non-executable by class {s['exec_failures']}")
    log(f"\n  -> {run / 'evaluate' / 'results.md'}")


# -----------------------------------------------------------------------------
# Command line: one flag per Config field (--ppo-* and --rm-* for the nested ones)

def tiny_and_paper_defaults(prefix):
    paper = PAPER.get(prefix.rstrip("-"), {}) if prefix else PAPER
    return lambda f: f"{f.default}" + (f"; paper: {paper[f.name]}" if f.name in paper else "")


def parse_args(argv=None):
    """(config, --from, --until) from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
)
    p.add_argument("--config", choices=sorted(PRESETS),
                   help="preset: tiny (offline, CPU; the default) or paper (gpt2-large, GPT-3.5 judge, one GPU). "
                        "Without it and without settings, an existing --run-dir resumes with its recorded settings")
    p.add_argument("--from", dest="from_stage", choices=list(STAGES), help="redo this stage and every later one")
    p.add_argument("--until", choices=list(STAGES), default="evaluate", help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, sizes, the judge's requests and "
                   "estimated cost, device) and exit: nothing runs, nothing is written, no network")
    for cls, prefix in ((Config, ""), (PPOConfig, "ppo-"), (RMConfig, "rm-"), (DPOConfig, "dpo-")):
        add_flags(p, cls, prefix, tiny_and_paper_defaults(prefix))
    args = vars(p.parse_args(argv))
    preset, from_stage, until, dry_run = args.pop("config"), args.pop("from_stage"), args.pop("until"), args.pop("dry_run")
    overrides = {k: v for k, v in args.items() if v is not None}
    cfg = make_config(preset or "tiny", **overrides)
    recorded = Path(cfg.run_dir) / "config.json"
    if preset is None and recorded.exists():  # an existing run: its own settings, plus the flags given
        cfg = config_from_record(json.loads(recorded.read_text()), recorded)
        for key, value in overrides.items():
            sub, name = key.split("_", 1) if key.startswith(("ppo_", "rm_", "dpo_")) else (None, key)
            setattr(getattr(cfg, sub) if sub else cfg, name, value)
    cfg.dry_run = dry_run  # not a setting of the run (asdict leaves it out): how this command runs
    return cfg, from_stage, until


def config_from_record(d, where):
    try:
        return Config(**dict(d, ppo=PPOConfig(**d["ppo"]), rm=RMConfig(**d["rm"]), dpo=DPOConfig(**d.get("dpo", {}))))
    except (TypeError, KeyError) as e:
        raise SystemExit(f"{where}: not a config of this version ({e}); start a new --run-dir") from None


GPT2_PARAMS = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1.5B"}


def print_plan(cfg, until):
    """--dry-run: what `python rlaif.py` with these settings would do, offline and without writing."""
    names = list(STAGES)[:list(STAGES).index(until) + 1]
    splits = prepare.load_splits("" if cfg.train_file == prepare.HUB_TRAIN else cfg.train_file, log=lambda *a: None)
    train = splits["train"]
    size = (f"{sum(p.numel() for p in GPT(preset_config(cfg.init, tokenizer_for(cfg).vocab_size)).parameters()) / 1e6:.1f}M"
            if cfg.init in CPU_PRESETS else GPT2_PARAMS.get(cfg.init, "size read from its config.json"))
    n_prompts = min(cfg.sample_prompts, len(train))
    n_answers = n_prompts * (cfg.samples_per_prompt + (3 if cfg.contrast_answers else 0))
    proxy = [dict(record=i % len(train), answer=prepare.format_answer(train[i % len(train)].sections, cfg.compact))
             for i in range(n_answers)]  # reference answers stand in for the answers not yet sampled
    judge = (f"{cfg.judge_model}: " + reward.plan_text(cfg.judge_model, *reward.judge_plan(
        cfg.judge_model, proxy, train, reward.APIDatabase())) if cfg.judge == "openai" else "rules judge (free)")
    cap = f", capped at ${cfg.judge_max_usd}" if cfg.judge_max_usd else ""
    lines = dict(sft=f"{cfg.sft_steps} steps x {cfg.sft_batch_size * cfg.sft_grad_accum} examples of "
                     f"{len(train)} instructions{' + 925 API pairs' if cfg.api_pairs else ''}",
                 sample=f"{n_prompts} instructions x {cfg.samples_per_prompt} answers at T={cfg.temperature}"
                        f"{' + 3 contrast answers each' if cfg.contrast_answers else ''}",
                 feedback=f"{n_answers} answers x {len(reward.QUESTIONS)} questions; {judge}{cap}",
                 reward=f"{cfg.rm.epochs} epoch(s) of judge-ordered pairs, {cfg.rm.batch_size} per step",
                 ppo=f"{cfg.ppo.iterations} iterations x {cfg.ppo.batch_size} rollouts of up to "
                     f"{cfg.max_answer_tokens} tokens ({cfg.ppo.rollouts_per_prompt} per prompt)",
                 compare=(f"d-RLAIF and RLOO ({cfg.ppo.iterations} x {cfg.ppo.batch_size} rollouts each; d-RLAIF asks "
                          f"the judge {cfg.ppo.iterations * cfg.ppo.batch_size * len(reward.QUESTIONS):,} questions), "
                          f"DPO {cfg.dpo.steps} steps, best-of-{cfg.best_of_n}") if cfg.compare else "skipped",
                 evaluate=f"{len(splits['test'][:cfg.eval_limit or None])} held-out questions, executability "
                          f"{cfg.exec_mode}")
    log(f"[dry run] {cfg.run_dir}: {cfg.init} ({size} parameters), device {cfg.device}; nothing is run"
        + (" (sizes of the offline split: the Hub's train file is not read)" if cfg.train_file == prepare.HUB_TRAIN
           else ""))
    for name in names:
        log(f"  {name:9s} {lines[name]}")


def main(argv=None):
    cfg, from_stage, until = parse_args(argv)
    if cfg.dry_run:
        return print_plan(cfg, until)
    t0 = time.time()
    run_pipeline(cfg, from_stage, until)
    log(f"\n[rlaif] total wall time {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main(sys.argv[1:])
