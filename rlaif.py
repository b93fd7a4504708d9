"""
RLAIF for code generation with API usage (Dutta et al. 2024, arXiv 2406.20060), end to end.

    python rlaif.py                  # offline default: tiny GPT-2 from scratch, rules judge, CPU, minutes
    python rlaif.py --config paper   # gpt2-large from HF weights, GPT-3.5 judge, one GPU, online

The paper's method, one function per stage, in order (each writes under --run-dir and is skipped when
its output exists, so an interrupted run resumes where it stopped; --from STAGE redoes from a stage):
  1. data      prepare the Gorilla APIBench HuggingFace split              data/gorilla/prepare.py
  2. sft       supervised fine-tuning on (instruction -> answer)           sft() below
  3. sample    sample answers to the training instructions from SFT        model.generate
  4. feedback  AI feedback: yes/no questions to a judge -> score in [0,1]  reward.judge_answers
  5. reward    reward model trained on the judge's scores                  reward.train_reward_model
  6. ppo       PPO against the reward model, KL penalty to SFT             ppo.train_ppo
  7. evaluate  SFT vs RLAIF vs Gorilla-7B on the held-out questions        evaluate.evaluate_models
"""
import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from data.gorilla import prepare
from model import (GPT, Tokenizer, autocast, default_device, generate, left_pad, load_checkpoint, lr_at,
                   make_optimizer, preset_config, response_logprobs, right_pad, save_checkpoint)

STAGES = ("data", "sft", "sample", "feedback", "reward", "ppo", "evaluate")


@dataclass
class Config:
    """Every knob of the pipeline. `tiny` (the default) and `paper` are the two presets below."""
    run_dir: str = "runs/tiny"
    seed: int = 1
    device: str = field(default_factory=default_device)
    # model / data
    init: str = "tiny"                 # a preset trained from scratch ("tiny") or HF weights ("gpt2-large")
    compact: bool = True               # tiny: compact vocabulary + answers without the explanation
    api_pairs: bool = True             # add the API database as extra SFT pairs (description -> api_call)
    hub_train: bool = False            # train on APIBench's huggingface_train.json from the Hub (online)
    max_answer_tokens: int = 192       # longer answers are truncated for training
    # SFT
    sft_steps: int = 900
    sft_batch_size: int = 16
    sft_grad_accum: int = 1
    sft_lr: float = 2e-3
    sft_warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 150
    # sampling answers for feedback
    samples_per_prompt: int = 4
    sample_prompts: int = 400          # how many training instructions get sampled answers
    max_new_tokens: int = 160
    temperature: float = 1.0
    # AI feedback
    judge: str = "rules"               # "rules" (offline stand-in) or "openai" (an OpenAI-compatible LLM)
    judge_model: str = "gpt-3.5-turbo"
    judge_base_url: str = ""           # e.g. http://localhost:8000/v1 for vLLM; empty = api.openai.com
    judge_concurrency: int = 8
    # reward model
    rm_epochs: int = 2
    rm_lr: float = 3e-4
    rm_batch_size: int = 16
    rm_loss: str = "pairwise"          # "pairwise" (Bradley-Terry) or "regression"
    # PPO (see ppo.PPOConfig for the algorithm's own knobs)
    ppo_iterations: int = 30
    # evaluation
    eval_limit: int = 0                # 0 = every held-out question
    exec_mode: str = "offline"         # "offline" (no network, checked stand-ins) or "real"


PAPER = dict(run_dir="runs/paper", init="gpt2-large", compact=False, api_pairs=False, hub_train=True,
             max_answer_tokens=512, sft_steps=3000, sft_batch_size=8, sft_grad_accum=4, sft_lr=5e-5,
             sft_warmup=100, eval_every=250, samples_per_prompt=4, sample_prompts=2000,
             max_new_tokens=512, judge="openai", rm_lr=1e-5, rm_batch_size=8, ppo_iterations=200,
             exec_mode="real")


def log(msg):
    print(msg, flush=True)


# -----------------------------------------------------------------------------
# 1. data

def tokenizer_for(cfg):
    return Tokenizer(prepare.VOCAB_FILE if cfg.compact else None)


def load_data(cfg):
    """train / val / test records. Test is always the held-out part of the eval file."""
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=log)
    splits = prepare.offline_splits(records)
    if cfg.hub_train:
        log("[data] split: train = APIBench huggingface_train.json (Hub), test = held-out eval records")
        splits["train"] = prepare.hub_train_records(log=log)
    else:
        log("[data] split: OFFLINE stand-in - APIBench's train file is not available here, so the eval "
            "file is split by a stable hash of the instruction (20% test, 5% val, 75% train)")
    log(f"[data] train {len(splits['train'])}, val {len(splits['val'])}, test {len(splits['test'])} records")
    return splits


def sft_examples(cfg, tok, records):
    """(prompt ids, answer ids ending in <|endoftext|>) pairs; the one prompt/answer format."""
    out = []
    for r in records:
        prompt = tok.encode(prepare.format_prompt(r.instruction))
        answer = tok.encode(prepare.format_answer(r.sections, explanation=not cfg.compact))
        out.append((prompt, answer[:cfg.max_answer_tokens - 1] + [tok.eot]))
    return out


# -----------------------------------------------------------------------------
# 2. sft

def init_model(cfg, tok):
    if cfg.init in ("tiny",):
        return GPT(preset_config(cfg.init, tok.vocab_size))
    return GPT.from_pretrained(cfg.init)  # HF weights: a local directory or a Hub name


def batch_tensors(examples, pad, device):
    query, query_mask = left_pad([p for p, _ in examples], pad, device)
    response, response_mask = right_pad([a for _, a in examples], pad, device)
    return query, query_mask, response, response_mask


def sft_loss(model, examples, pad, device):
    """Mean negative log-likelihood of the answer tokens; prompt tokens carry no loss."""
    query, query_mask, response, response_mask = batch_tensors(examples, pad, device)
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


def sft(cfg, tok, train, val, out_dir):
    """Supervised fine-tuning. Batches are drawn from a generator seeded by (seed, step), so a run
    resumed from a checkpoint sees exactly the batches the uninterrupted run would have."""
    out_dir = Path(out_dir)
    ckpt_file = out_dir / "ckpt.pt"
    torch.manual_seed(cfg.seed)
    model = init_model(cfg, tok).to(cfg.device)
    optimizer = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
    step, history = 0, []
    if ckpt_file.exists():
        ckpt = load_checkpoint(ckpt_file, cfg.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        log(f"[sft] resumed from {ckpt_file} at step {step}")
    model.train()
    t0, tokens_seen, start = time.time(), 0, step
    while step < cfg.sft_steps:
        lr = lr_at(step, cfg.sft_lr, cfg.sft_warmup, cfg.sft_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rng = random.Random(cfg.seed * 1_000_003 + step)
        for _ in range(cfg.sft_grad_accum):
            loss, n_tokens = sft_loss(model, rng.sample(train, cfg.sft_batch_size), tok.eot, cfg.device)
            (loss / cfg.sft_grad_accum).backward()
            tokens_seen += n_tokens
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(dict(step=step, loss=round(loss.item(), 4), lr=lr))
        if step % 25 == 0 or step == cfg.sft_steps:
            elapsed = time.time() - t0
            eta = elapsed / (step - start) * (cfg.sft_steps - step)
            log(f"[sft] step {step}/{cfg.sft_steps} loss {loss.item():.3f} lr {lr:.2e} "
                f"{tokens_seen / elapsed:,.0f} tok/s ETA {eta / 60:.1f} min")
        if step % cfg.eval_every == 0 or step == cfg.sft_steps:
            history[-1]["val_loss"] = round(validation_loss(model, val, tok.eot, cfg.device), 4)
            log(f"[sft] step {step} val loss {history[-1]['val_loss']:.3f}")
            save_checkpoint(ckpt_file, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, history=history)
    model.eval()
    model.save_pretrained(out_dir / "model")
    return model, history
