"""
AI feedback and the reward model (Dutta et al. 2024, section 3.2).

1. A judge answers fixed yes/no questions about each sampled answer, seeing the instruction, the answer
   and the API database entry its api_call refers to. Each question's answer becomes P(yes) (from the
   judge's log-probabilities of "Yes"/"No" when the endpoint returns them, from its text otherwise);
   the weighted sum of the P(yes) is the answer's score in [0, 1].
     - OpenAIJudge: GPT-3.5 (the paper) or any OpenAI-compatible server (vLLM, Ollama) by base_url.
     - RulesJudge: the offline stand-in. It answers the same questions with deterministic checks and
       labels every record "rules judge": it is NOT LLM feedback.
2. A reward model (GPT-2 backbone + scalar head) learns the scores with a pairwise Bradley-Terry loss
   (or regression), then is normalised to mean 0 / std 1 on SFT samples (lm-human-preferences).
"""
import ast
import hashlib
import json
import math
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.gorilla import prepare
from evaluate import API_NAMES_FILE, APIDatabase, answer_api_call, calls_in, known_model_ids
from model import GPT, autocast, load_checkpoint, make_optimizer, pad_pairs, save_checkpoint

# (key, question, weight). Relevance gates the rest: score = 0.25 P(domain_right) + P(domain_right) x
# sum(weight x P(yes)) over the other questions. Without the gate, PPO against these questions collapsed onto
# one generic documented API for every task (joblib.load('model.joblib'): real, valid, it runs) - executable
# and useless; a full gate (no 0.25 term) left too few judge-ordered pairs to train on (README, "How we got here").
GATE = "domain_right"
QUESTIONS = (
    ("domain_right", "Is the answer's <<<domain>>> the right one for the task in the instruction?", 0.25),
    ("api_exists", "Does the answer's api_call call an API that exists in the API documentation shown?", 0.1),
    ("api_fits_task", "Is that API appropriate for the task described in the instruction?", 0.3),
    ("arguments_right", "Are the api_call's arguments (model id, task name) the right ones for this task?", 0.1),
    ("code_valid", "Is the code section valid, complete Python that names only real models and tasks?", 0.15),
    ("code_uses_api", "Does the code actually call the API named in the api_call?", 0.1),
)
PRICE_PER_MTOK = {"gpt-3.5-turbo": (0.5, 1.5)}  # USD per million (input, output) tokens


def combine(answers):
    """Score in [0, 1] from {question: P(yes)} (see QUESTIONS); None if any question has no answer."""
    if any(answers.get(k) is None for k, _, _ in QUESTIONS):
        return None
    gate = answers[GATE] if GATE else 1.0
    return sum(w * answers[k] * (1.0 if k == GATE else gate) for k, _, w in QUESTIONS)


# -----------------------------------------------------------------------------
# The judges

def judge_prompt(instruction, answer, api_entry, question):
    doc = json.dumps(api_entry, indent=1) if api_entry else "(no entry of the API database matches this api_call)"
    return (f"You are reviewing code written to use a Hugging Face API.\n\n"
            f"### Instruction\n{instruction}\n\n### Answer\n{answer.strip()}\n\n"
            f"### API documentation for the answer's api_call\n{doc}\n\n"
            f"### Question\n{question}\nAnswer with a single word, Yes or No.")


class RulesJudge:
    """Deterministic answers to QUESTIONS. It knows each instruction's reference API, which an LLM judge
    does not. Its API check is exact (the api_call must be one the documentation lists), not Gorilla's
    lenient AST match: PPO against a lenient judge learned to write pipeline('text-generation',
    model='<invented>'), which that match accepts (see README, "How we got here")."""
    name = "rules judge"

    def __init__(self, db=None):
        self.db = db or APIDatabase()
        self.model_ids = set(known_model_ids(self.db.apis))
        self.tasks = set(json.loads(API_NAMES_FILE.read_text())["pipeline_tasks"])

    def code_valid(self, code):
        """Parses as Python, and every model id and pipeline task it names exists (static, not run)."""
        try:
            tree = ast.parse(code) if code.strip() else None
        except (SyntaxError, ValueError):
            return False
        if tree is None:
            return False
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", node.value) and node.value not in self.model_ids:
                return False
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("pipeline") and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value not in self.tasks \
                    and not str(node.args[0].value).startswith("translation"):
                return False
        return True

    def answers(self, record, answer):
        code = prepare.parse_answer(answer)["code"]
        i = self.db.exact(answer_api_call(answer))
        entry = self.db.apis[i] if i is not None else None
        name, args = self.db.refs[i] if i is not None else (None, [])
        uses_api = any(n == name and all(a in cargs for a in args) for n, cargs in calls_in(code))
        yes = dict(domain_right=prepare.parse_answer(answer)["domain"] == record.api_data.get("domain"),
                   api_exists=entry is not None,
                   api_fits_task=entry is not None and entry["domain"] == record.api_data.get("domain"),
                   arguments_right=entry is not None and entry["api_call"] == record.api_data.get("api_call"),
                   code_valid=self.code_valid(code),
                   code_uses_api=entry is not None and uses_api)
        return {k: float(v) for k, v in yes.items()}


class JudgeError(Exception):
    pass


class OpenAIJudge:
    """Asks an OpenAI-compatible chat endpoint each question, one request per (answer, question), with
    bounded concurrency, retries with exponential backoff and jitter, and an append-only cache."""

    def __init__(self, model="gpt-3.5-turbo", base_url="", cache_file=None, concurrency=8,
                 max_retries=5, timeout=30.0, backoff=1.0, api_key=None, db=None, log=print):
        import os
        import openai
        self.openai, self.model, self.log = openai, model, log
        self.name = f"LLM judge {model}" + (f" at {base_url}" if base_url else "")
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("none" if base_url else None)
        if key is None:
            raise RuntimeError("the OpenAI judge needs OPENAI_API_KEY (or --judge-base-url for a local "
                               "OpenAI-compatible server); use --judge rules for the offline stand-in")
        self.client = openai.OpenAI(api_key=key, base_url=base_url or None, timeout=timeout, max_retries=0)
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.db = db or APIDatabase()
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache, self.lock = {}, threading.Lock()
        self.tokens = [0, 0]  # prompt, completion tokens actually paid for
        if self.cache_file and self.cache_file.exists():
            for line in self.cache_file.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["p_yes"]
                except (json.JSONDecodeError, KeyError):
                    pass  # a line cut short by a crash: that judgement is simply asked again

    def key(self, prompt):
        return hashlib.sha256(f"{self.model}\n{prompt}".encode()).hexdigest()

    def ask(self, prompt):
        """P(yes) for one prompt, from the cache or the endpoint; raises JudgeError after the retries."""
        key = self.key(prompt)
        if key in self.cache:
            return self.cache[key]
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))  # full jitter
            try:
                p_yes, usage = self.request(prompt)
            except (self.openai.RateLimitError, self.openai.APITimeoutError, self.openai.APIConnectionError,
                    self.openai.InternalServerError, self.openai.APIResponseValidationError, JudgeError,
                    ValueError) as e:  # ValueError: a body that is not JSON
                last = e
                continue
            except self.openai.APIStatusError as e:
                if e.status_code >= 500:
                    last = e
                    continue
                raise JudgeError(f"judge endpoint refused the request: {e}") from e
            with self.lock:
                self.tokens[0] += usage[0]
                self.tokens[1] += usage[1]
                self.cache[key] = p_yes
                if self.cache_file:
                    self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.cache_file, "a") as f:  # append-only: a finished judgement is never lost
                        f.write(json.dumps(dict(key=key, p_yes=p_yes)) + "\n")
            return p_yes
        raise JudgeError(f"gave up after {self.max_retries + 1} attempts: {type(last).__name__}: {last}")

    def request(self, prompt):
        r = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}],
            max_tokens=1, temperature=0, logprobs=True, top_logprobs=5)
        try:
            choice = r.choices[0]
            text = (choice.message.content or "").strip().lower()
            usage = (r.usage.prompt_tokens, r.usage.completion_tokens) if r.usage else (0, 0)
        except (AttributeError, IndexError, TypeError) as e:
            raise JudgeError(f"malformed reply: {e}") from e
        top = {}
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if content:
            for t in content[0].top_logprobs or []:
                word = t.token.strip().lower()
                if word in ("yes", "no") and word not in top:
                    top[word] = math.exp(t.logprob)
        if top:  # P(yes) renormalised over {yes, no}, the paper's log-probability score
            return top.get("yes", 0.0) / (top.get("yes", 0.0) + top.get("no", 0.0)), usage
        if text.startswith("yes"):
            return 1.0, usage
        if text.startswith("no"):
            return 0.0, usage
        raise JudgeError(f"reply is neither Yes nor No: {text[:40]!r}")

    def answers(self, record, answer):
        i = self.db.match(answer_api_call(answer))
        entry = self.db.apis[i] if i is not None else None
        out = {}
        for key, question, _ in QUESTIONS:
            try:
                out[key] = self.ask(judge_prompt(record.instruction, answer, entry, question))
            except JudgeError as e:
                out[key] = None
                out.setdefault("error", str(e))
        return out

    def cost(self):
        price = PRICE_PER_MTOK.get(self.model)
        usd = f", ${(self.tokens[0] * price[0] + self.tokens[1] * price[1]) / 1e6:.4f}" if price else ""
        return f"{self.tokens[0]:,} prompt + {self.tokens[1]:,} completion tokens{usd}"


def source_of(row):
    """"policy", or which contrast answer a sample/feedback row is (rlaif.contrast_answers); rows of runs
    from before contrast answers have no field and are all policy samples."""
    return row.get("source", "policy")


def judge_answers(judge, samples, records, out_file, concurrency=1, log=print):
    """Judge every sample {id, record, answer}; feedback records are appended to out_file as they
    finish, and samples already in it are skipped, so an interrupted run resumes without re-asking."""
    out_file = Path(out_file)
    done = {}
    if out_file.exists():
        for line in out_file.read_text().splitlines():
            try:
                r = json.loads(line)
                done[r["id"]] = r
            except (json.JSONDecodeError, KeyError):
                pass
    todo = [s for s in samples if s["id"] not in done]
    log(f"[feedback] judge: {judge.name}; {len(done)} judged already, {len(todo)} to go")
    lock, t0 = threading.Lock(), time.time()

    def one(sample):
        answers = judge.answers(records[sample["record"]], sample["answer"])
        error = answers.pop("error", None)
        result = dict(id=sample["id"], record=sample["record"], source=source_of(sample),
                      judge=judge.name, answers=answers, score=combine(answers), error=error)
        with lock:
            with open(out_file, "a") as f:
                f.write(json.dumps(result) + "\n")
            done[sample["id"]] = result
            n = len(done)
            if n % 100 == 0 or n == len(samples):
                cost = f", {judge.cost()}" if hasattr(judge, "cost") else ""
                log(f"[feedback] {n}/{len(samples)} judged ({time.time() - t0:.0f}s{cost})")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(one, todo))
    failed = sum(r["score"] is None for r in done.values())
    if failed:
        log(f"[feedback] {failed} sample(s) have no score (judge gave up); they are left out of training")
    return [done[s["id"]] for s in samples]


# -----------------------------------------------------------------------------
# The reward model

class ScalarModel(nn.Module):
    """GPT-2 backbone + a linear head giving one scalar per position. The reward model reads it at the
    last real token; PPO's value model (initialised from the reward model) reads it at every step."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(backbone.config.n_embd + 1))  # lm-human-preferences
        nn.init.zeros_(self.head.bias)
        self.register_buffer("gain", torch.ones(()))   # reward normalisation, set after training
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, ids, mask):
        return self.head(self.backbone.hidden_states(ids, mask)).squeeze(-1)

    def score(self, query, query_mask, response, response_mask):
        """Normalised reward of each (query, response): the head at the response's last real token."""
        scalars = self(torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1))
        last = query.size(1) + response_mask.sum(1) - 1
        return self.gain * scalars.gather(1, last[:, None]).squeeze(1) + self.bias

    def save(self, path, **extra):
        save_checkpoint(path, model=self.state_dict(), config=vars(self.backbone.config), **extra)

    @classmethod
    def load(cls, path, device="cpu"):
        from model import config_from_dict
        ckpt = load_checkpoint(path, device)
        m = cls(GPT(config_from_dict(ckpt["config"])))
        m.load_state_dict(ckpt["model"])
        return m.to(device), ckpt


@dataclass
class RMConfig:
    epochs: int = 2
    """passes over the training pairs"""
    lr: float = 3e-4
    """AdamW learning rate (constant)"""
    batch_size: int = 16
    """pairs (or single answers, for regression) per step"""
    loss: str = "pairwise"
    """pairwise: Bradley-Terry on judge-ordered pairs of answers to one prompt; regression: MSE on the score"""
    max_pairs_per_prompt: int = 3
    """judge-ordered pairs kept per prompt (ties are dropped)"""
    heldout_fraction: float = 0.1
    """prompts held out to measure pairwise accuracy on the policy's own answers"""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)"""
    seed: int = 1
    """seed of the held-out split and batch order (rlaif.py: --seed unless given)"""


def make_pairs(feedback, max_per_prompt, rng):
    """(better id, worse id) pairs within each prompt, ordered by judge score; ties are dropped."""
    by_record = {}
    for f in feedback:
        if f["score"] is not None:
            by_record.setdefault(f["record"], []).append(f)
    pairs = []
    for group in by_record.values():
        ps = [(a["id"], b["id"]) for a in group for b in group if a["score"] > b["score"]]
        rng.shuffle(ps)
        pairs.extend(ps[:max_per_prompt])
    return pairs


def rm_batch(samples, ids, tok, device):
    return pad_pairs([(samples[i]["query"], samples[i]["response"]) for i in ids], tok.eot, device)


@torch.no_grad()
def rm_scores(rm, samples, ids, tok, device, batch_size=32):
    rm.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        with autocast(device):
            out.append(rm.score(*rm_batch(samples, ids[i:i + batch_size], tok, device)).float())
    return torch.cat(out) if out else torch.zeros(0)


def train_reward_model(rm, samples, feedback, tok, cfg, device, ckpt_file, log=print):
    """Train on judge scores; returns held-out metrics. samples: {id: {query, response}} token lists."""
    rng = random.Random(cfg.seed)
    records = sorted({f["record"] for f in feedback})
    rng.shuffle(records)
    heldout_records = set(records[:max(1, int(len(records) * cfg.heldout_fraction))])
    train_fb = [f for f in feedback if f["record"] not in heldout_records]
    # Held-out pairs are policy samples only: the answers PPO will ask the reward model about.
    test_fb = [f for f in feedback if f["record"] in heldout_records and f["score"] is not None
               and source_of(f) == "policy"]
    train_pairs = make_pairs(train_fb, cfg.max_pairs_per_prompt, rng)
    test_pairs = make_pairs(test_fb, 10 ** 9, rng)
    scored = [f for f in train_fb if f["score"] is not None]
    units = train_pairs if cfg.loss == "pairwise" else scored
    steps = cfg.epochs * math.ceil(len(units) / cfg.batch_size)
    if not train_pairs and cfg.loss == "pairwise":
        log("[reward] WARNING: no judge-ordered pairs (every answer to a prompt got the same score), so the "
            "reward model stays untrained and PPO has no signal. Train SFT longer (--sft-steps) or sample "
            "more answers per prompt (--samples-per-prompt).")
    log(f"[reward] {len(train_pairs)} train pairs, {len(test_pairs)} held-out pairs "
        f"({len(heldout_records)} held-out prompts), {steps} steps, loss {cfg.loss}")
    optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    step = 0
    if Path(ckpt_file).exists():
        ckpt = load_checkpoint(ckpt_file, device)
        rm.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        log(f"[reward] resumed at step {step}")
    mean_score = sum(f["score"] for f in scored) / max(1, len(scored))
    order = []  # every step's batch, fixed up front so a resumed run trains on the same batches
    for epoch in range(cfg.epochs):
        perm = list(range(len(units)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(perm)
        order += [perm[i:i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
    t0 = time.time()
    while step < steps:
        batch = [units[i] for i in order[step]]
        rm.train()
        with autocast(device):
            if cfg.loss == "pairwise":
                r = rm.score(*rm_batch(samples, [a for a, _ in batch] + [b for _, b in batch], tok, device))
                loss = -F.logsigmoid(r[:len(batch)] - r[len(batch):]).mean()  # Bradley-Terry
            else:
                r = rm.score(*rm_batch(samples, [f["id"] for f in batch], tok, device))
                target = torch.tensor([f["score"] - mean_score for f in batch], device=device)
                loss = F.mse_loss(r.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 20 == 0 or step == steps:
            log(f"[reward] step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
            rm.save(ckpt_file, optimizer=optimizer.state_dict(), step=step)
    return heldout_metrics(rm, samples, test_fb, test_pairs, tok, device)


def heldout_metrics(rm, samples, test_fb, test_pairs, tok, device):
    """Pairwise accuracy on held-out prompts' judge-ordered pairs, and Pearson r with judge scores."""
    ids = [f["id"] for f in test_fb]
    r = dict(zip(ids, rm_scores(rm, samples, ids, tok, device).tolist()))
    acc = sum(r[a] > r[b] for a, b in test_pairs) / max(1, len(test_pairs))
    x = torch.tensor([r[i] for i in ids])
    y = torch.tensor([f["score"] for f in test_fb])
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1]) if len(ids) > 1 else float("nan")
    return dict(heldout_pairwise_accuracy=acc, heldout_pairs=len(test_pairs),
                heldout_correlation=corr, heldout_samples=len(ids))


def normalise(rm, samples, ids, tok, device):
    """Set gain/bias so rewards on SFT samples have mean 0 and std 1 (lm-human-preferences)."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    r = rm_scores(rm, samples, ids, tok, device)
    rm.gain.fill_(1.0 / (r.std().item() + 1e-8))
    rm.bias.fill_(-r.mean().item() / (r.std().item() + 1e-8))
