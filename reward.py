"""
AI feedback and the reward model (Dutta et al. 2024, section 3.2).

1. A judge answers fixed yes/no questions about each sampled answer, seeing the instruction, the
   answer and the API database entry its api_call refers to. Each question's answer becomes
   P(yes) (from the judge's log-probabilities of "Yes"/"No" when the endpoint returns them, from
   its text otherwise, counted in feedback/done.json); the weighted sum of the P(yes) is the
   answer's score in [0, 1]. The feedback stage is done only when every answer has a score
   (judge_answers).
     - OpenAIJudge: GPT-3.5 (the paper) or any OpenAI-compatible server (vLLM, Ollama) by base_url.
     - RulesJudge: the offline stand-in. It answers the same questions with deterministic checks and
       labels every record "rules judge": it is NOT LLM feedback.
2. A reward model (GPT-2 backbone + scalar head, model.ScalarModel) learns the scores with a
   pairwise Bradley-Terry loss, then is normalised to mean 0 / std 1 on SFT samples
   (lm-human-preferences). [not in the paper] It reads each answer followed by a tool's report on
   it (tool_report: the API database's entry for its api_call, the model ids the database does
   not know, whether the code parses).

    python reward.py --run-dir runs/tiny --force    # redo the reward stage of a run (see rlaif.py)

The feedback stage (feedback_stage, below) has no script of its own: python rlaif.py --run-dir R
--from feedback redoes it and what follows.
"""

import ast
import dataclasses
import hashlib
import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from data.gorilla import prepare
from data.gorilla.apis import APIDatabase, answer_api_call, canonical_domain, library_names, squash
from model import GPT, ScalarModel, pad_pairs, right_pad
from runs import (
    DIST,
    RUN_FILES,
    Feedback,
    Sample,
    autocast,
    average_gradients,
    barrier,
    check_loss,
    global_mean,
    is_main,
    length_grouped_batches,
    load_checkpoint,
    log,
    make_optimizer,
    progress,
    read_rows,
    require_items,
    resume,
    run_stage,
    shard,
    stage_command_line,
    stream_seed,
    write_metrics,
    write_rows,
)

# -----------------------------------------------------------------------------
# Settings of the reward model (rlaif.py --rm-*, python reward.py --*)


@dataclass
class RMConfig:
    epochs: Annotated[int, "passes over the training pairs", ">= 1"] = 1
    lr: Annotated[float, "AdamW learning rate (constant)", "> 0"] = 3e-4
    batch_size: Annotated[int, "judge-ordered pairs per step, from as many prompts", ">= 1"] = 16
    max_contrast_pairs: Annotated[
        int,
        "pairs with a contrast answer kept per prompt; every judge-ordered pair of "
        "the policy's own answers is kept (ties are dropped)",
        ">= 0",
    ] = 4
    heldout_fraction: Annotated[
        float,
        "prompts held out to measure pairwise accuracy on the policy's own answers",
        ">= 0 and < 1",
    ] = 0.1
    val_fraction: Annotated[
        float,
        "training prompts set aside to choose the step that is kept (the best "
        "validation accuracy among the trained steps)",
        ">= 0 and < 1",
    ] = 0.1
    eval_every: Annotated[
        int, "steps between measurements of the held-out and validation pairs", ">= 1"
    ] = 50
    train_blocks: Annotated[
        int,
        "top transformer blocks trained with the head (-1: the whole network; 0: the "
        "head alone, a probe on the SFT features)",
        ">= -1",
    ] = -1
    margin: Annotated[
        float,
        "Llama 2's margin: the pair's judge-score difference x this, subtracted inside "
        "the Bradley-Terry loss (0 = none)",
        ">= 0",
    ] = 0.0
    weight_decay: Annotated[float, "AdamW weight decay (matrices only)", ">= 0"] = 0.0
    tools: Annotated[
        bool,
        "[not in the paper] the reward model reads a tool report after each answer (the "
        "API database's entry for its api_call, unknown model ids, whether the code "
        "parses; reward.tool_report)",
    ] = True
    aux_weight: Annotated[
        float,
        "[not in the paper] weight of the auxiliary loss: one logit per judge question, "
        "binary cross-entropy against the judge's P(yes) (0 = scalar head only)",
        ">= 0",
    ] = 1.0


# -----------------------------------------------------------------------------
# 1. AI feedback: the questions, the judges, the score

# (key, question, weight). The score is the weighted sum of P(yes). [not in the paper] The weights
# follow what the paper measures: executable code (code_valid, 0.3) and the right API for the task
# (api_fits_task, 0.3: Gorilla's AST accuracy), with 0.1 for each of the other checks. No question
# gates the others, so runnable code with a wrong API is worth more than garbage, and an answer is
# not rewarded twice for its domain. A generic runnable API for every task (the reward hack a
# score without task fit invites) scores at most 0.6 against 1.0 for the right one
# (docs/experiments.md, "What changed, and why").
QUESTIONS = (
    (
        "domain_right",
        "Is the answer's <<<domain>>> the right one for the task in the instruction?",
        0.1,
    ),
    (
        "api_exists",
        "Does the answer's api_call call an API that exists in the API documentation shown?",
        0.1,
    ),
    ("api_fits_task", "Does that API do the task described in the instruction?", 0.3),
    (
        "arguments_right",
        "Are the api_call's arguments (model id, task name) the right ones for this task?",
        0.1,
    ),
    (
        "code_valid",
        "Is the code section valid, complete Python that names only real models and tasks?",
        0.3,
    ),
    ("code_uses_api", "Does the code actually call the API named in the api_call?", 0.1),
)
PRICE_PER_MTOK = {"gpt-3.5-turbo": (0.5, 1.5)}  # USD per million (input, output) tokens


def judge_price(model, price=""):
    """(USD per million input tokens, per million output tokens) of `model`: --judge-price
    "IN,OUT" when given, else PRICE_PER_MTOK's, else None (unknown). ValueError for a
    --judge-price that is not two numbers >= 0."""
    if not price:
        return PRICE_PER_MTOK.get(model)
    try:
        pair = tuple(float(x) for x in price.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(
            f"--judge-price {price!r}: give USD per million input and output tokens, e.g. 2.5,10"
        )
    return pair


def judge_cost_usd(model, input_tokens, output_tokens, price=None):
    """USD for that many tokens of `model` at `price` (else PRICE_PER_MTOK's),
    or None for an unknown price."""
    price = price or PRICE_PER_MTOK.get(model)
    return None if price is None else (input_tokens * price[0] + output_tokens * price[1]) / 1e6


def judge_setting_problems(model, max_usd, price):
    """What makes --judge-model / --judge-max-usd / --judge-price unusable, before
    anything runs: a cap on a model without a price would be a cap on nothing (every
    request sent, "cost unknown")."""
    try:
        known = judge_price(model, price)
    except ValueError as e:
        return [str(e)]
    if max_usd and known is None:
        return [
            f"--judge-max-usd {max_usd}: no price is known for --judge-model {model}, so the cap "
            "could not be kept; give one with --judge-price IN,OUT (USD per million input,output "
            "tokens)"
        ]
    return []


def approx_tokens(text):
    """Tokens of a judge prompt, approximately (about 3.5 characters a token in
    English with code): the judge's own tokenizer is not available offline, and a
    budget must be known before any call."""
    return len(text) * 2 // 7 + 1


def judge_plan(model, todo, records, db, price=None):
    """(requests, input tokens, output tokens, USD or None) to judge the Samples `todo`:
    len(QUESTIONS) requests each, one output token each."""
    tokens = 0
    # many answers repeat (the same API call sampled again): each is matched once
    known = {}
    for s in todo:
        if (s.record, s.answer) not in known:
            entry = db.apis[i] if (i := db.match(answer_api_call(s.answer))) is not None else None
            known[s.record, s.answer] = sum(
                approx_tokens(judge_prompt(records[s.record].instruction, s.answer, entry, q))
                for _, q, _ in QUESTIONS
            )
        tokens += known[s.record, s.answer]
    requests = len(todo) * len(QUESTIONS)
    return requests, tokens, requests, judge_cost_usd(model, tokens, requests, price)


def plan_text(model, requests, tokens_in, tokens_out, usd):
    cost = (
        f"about ${usd:.2f}"
        if usd is not None
        else f"cost unknown (no price for {model!r}: --judge-price)"
    )
    return (
        f"{requests:,} requests, about {tokens_in:,} input + {tokens_out:,} output tokens, {cost}"
    )


class JudgeBudgetExceeded(Exception):
    pass


def judge_score(judge, record, answer):
    """The judge's score of one answer outside the feedback stage (d-RLAIF's rollouts,
    best-of-n, greedy validation). An answer the judge could not score stops the caller with
    the judge's error, rather than becoming a made-up score; the stage resumes from its
    checkpoint and the judge's cache."""
    answers = judge.answers(record, answer)
    score = combine(answers)
    if score is None:
        raise JudgeError(
            f"the judge could not score an answer after its retries: {answers.get('error')}"
        )
    return score


def combine(answers):
    """Score in [0, 1] from {question: P(yes)} (see QUESTIONS); None if
    any question has no answer."""
    if any(answers.get(k) is None for k, _, _ in QUESTIONS):
        return None
    return sum(w * answers[k] for k, _, w in QUESTIONS)


# -----------------------------------------------------------------------------
# The judges


def judge_prompt(instruction, answer, api_entry, question):
    doc = (
        json.dumps(api_entry, indent=1)
        if api_entry
        else "(no entry of the API database matches this api_call)"
    )
    return (
        f"You are reviewing code written to use a Hugging Face API.\n\n"
        f"### Instruction\n{instruction}\n\n### Answer\n{answer.strip()}\n\n"
        f"### API documentation for the answer's api_call\n{doc}\n\n"
        f"### Question\n{question}\nAnswer with a single word, Yes or No."
    )


class RulesJudge:
    """[offline stand-in] Deterministic answers to QUESTIONS. It knows each instruction's
    reference API, which an LLM judge does not. The API is found with the one matcher
    (APIDatabase.match, Gorilla's AST match, as in evaluation); an api_call that passes a model
    id the documentation does not have does not exist (PPO against a judge without that check
    learned pipeline('text-generation', model='<invented>'), docs/experiments.md). Domains are
    compared as canonical_domain labels."""

    name = "rules judge"

    def __init__(self, db=None):
        self.db = db or APIDatabase()
        self.tasks = set(library_names()["pipeline_tasks"])

    def code_valid(self, code):
        """Parses as Python, and every model id and pipeline task it names
        exists (static, not run)."""
        try:
            tree = ast.parse(code) if code.strip() else None
        except (SyntaxError, ValueError):
            return False
        if tree is None or self.db.unknown_model_ids(code):
            return False
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and ast.unparse(node.func).endswith("pipeline")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value not in self.tasks
                and not str(node.args[0].value).startswith("translation")
            ):
                return False
        return True

    def answers(self, record, answer):
        sections = prepare.parse_answer(answer)
        api_call = answer_api_call(answer)
        i = self.db.match(api_call)
        if i is not None and self.db.unknown_model_ids(api_call):
            i = None  # a documented call shape with an invented model: not a documented API
        task = canonical_domain(record.api_data.get("domain") or record.sections.get("domain"))
        reference = str(record.api_data.get("api_call") or record.sections.get("api_call"))
        ref = self.db.match(reference)
        yes = dict(
            domain_right=canonical_domain(sections["domain"]) == task,
            api_exists=i is not None,
            api_fits_task=i is not None and canonical_domain(self.db.apis[i]["domain"]) == task,
            arguments_right=i is not None
            and (
                self.db.makes_call(api_call, ref)
                if ref is not None
                else squash(api_call) == squash(reference)
            ),
            code_valid=self.code_valid(sections["code"]),
            code_uses_api=i is not None and self.db.makes_call(sections["code"], i),
        )
        return {k: float(v) for k, v in yes.items()}


class JudgeError(Exception):
    pass


class UnusableReply(JudgeError):
    """A reply that is neither Yes nor No: paid for, and no answer."""

    def __init__(self, reply, usage):
        super().__init__(f"the judge replied {reply!r}, neither Yes nor No")
        self.reply = reply
        self.usage = usage


class JudgeFailed(Exception):
    """Answers left without a score: the feedback stage is not done
    (feedback_stage says how to resume)."""


# How long the judge waits before asking again, and why. A rate-limited endpoint says how long
# (Retry-After): the judge waits that long, but at most RETRY_AFTER_CAP_S (a server asking for an
# hour is asked again after two minutes, and again: the retries run out and the stage stops,
# resumable). Without a Retry-After (connection refused, 5xx, time-outs) the wait doubles from
# --backoff up to BACKOFF_CAP_S: about three minutes over the 8 retries, so a minute-long outage is
# waited out. A reply that is neither Yes nor No comes back fast and mostly the same again
# (temperature 0): it is asked again UNUSABLE_RETRIES times, at once.
RETRY_AFTER_CAP_S = 120.0
BACKOFF_CAP_S = 60.0
UNUSABLE_RETRIES = 2


def retry_after_s(response):
    """Seconds an HTTP response asks to wait (Retry-After-Ms, or Retry-After in seconds or as an
    HTTP date), or None when it does not say."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def judge_api_key(base_url, api_key=None):
    """The key sent to the judge: a local server (base_url) needs none, api.openai.com does."""
    return api_key or os.environ.get("OPENAI_API_KEY") or ("none" if base_url else None)


def reply_p_yes(r):
    """(P(yes), (prompt, completion) tokens, from_text) of a chat completion. P(yes) is the
    paper's: the log-probabilities of "Yes" and "No" renormalised over the two.
    UnusableReply if it is neither.

    Missing log-probabilities are counted, not refused. Some OpenAI-compatible servers (local
    builds, proxies) return none; their Yes/No text still answers the question, as a P(yes)
    of 0 or 1. Refusing them would make those judges unusable; taking them silently would
    change what a score means (0 or 1 where the paper has a probability). So from_text marks
    them: the cache keeps the mark, the first one is logged, and feedback/done.json counts
    them per answer (p_yes_from_text)."""
    try:
        choice = r.choices[0]
        text = (choice.message.content or "").strip()
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
    if top:
        return top.get("yes", 0.0) / (top.get("yes", 0.0) + top.get("no", 0.0)), usage, False
    if text.lower().startswith("yes"):
        return 1.0, usage, True
    if text.lower().startswith("no"):
        return 0.0, usage, True
    raise UnusableReply(text[:80], usage)


class OpenAIJudge:
    """Asks an OpenAI-compatible chat endpoint each question, one request per (answer,
    question), retried as RETRY_AFTER_CAP_S above says, with an append-only cache that also
    records what each reply cost (so that --judge-max-usd holds for the whole run). Thread-safe:
    judge_answers calls it from a pool of
    --judge-concurrency threads."""

    def __init__(
        self,
        model="gpt-3.5-turbo",
        base_url="",
        cache_file=None,
        max_retries=8,
        timeout=30.0,
        backoff=1.0,
        api_key=None,
        db=None,
        max_usd=0.0,
        price=None,
        log=log,
    ):
        import openai  # only the LLM judge needs it

        self.openai = openai
        self.model = model
        self.log = log
        self.name = f"LLM judge {model}" + (f" at {base_url}" if base_url else "")
        key = judge_api_key(base_url, api_key)
        if key is None:
            raise RuntimeError(
                "the OpenAI judge needs OPENAI_API_KEY (or --judge-base-url for a local "
                "OpenAI-compatible server); use --judge rules for the offline stand-in"
            )
        # USD per million (input, output) tokens, or None
        self.price = price or PRICE_PER_MTOK.get(model)
        if max_usd and self.price is None:
            raise JudgeError(judge_setting_problems(model, max_usd, "")[0])
        self.client = openai.OpenAI(
            api_key=key, base_url=base_url or None, timeout=timeout, max_retries=0
        )
        self.max_retries = max_retries
        self.backoff = backoff
        self.db = db or APIDatabase()
        self.cache_file = Path(cache_file) if cache_file else None
        self.cache = {}  # {prompt key: P(yes)}
        self.from_text = set()  # keys whose P(yes) was read from the reply's text
        self.lock = threading.Lock()
        self.said = {}  # {kind of message: when it was last logged} (say)
        self.tokens = [0, 0]  # prompt, completion tokens this process paid for
        # What the run paid before (the cache file): USD of priced replies, tokens of the others
        self.usd_before = 0.0
        self.tokens_before = [0, 0]
        # prompt, completion tokens and replies of those earlier requests
        self.billed_before = [0, 0, 0]
        self.max_usd = max_usd  # budget (0 = none)
        self.reserved = 0.0  # USD in flight
        self.paid_requests = 0
        if self.cache_file and self.cache_file.exists():
            self.read_cache()

    def read_cache(self):
        """The run's judgements and spending so far. Each line is one paid reply: a judgement
        (key, p_yes, text) or a reply that answered nothing (unusable), with its tokens and usd
        (None when no price was known: its tokens are priced now). Lines of older versions have no
        usd: their cost is not known."""
        for line in self.cache_file.read_text().splitlines():
            try:
                entry = json.loads(line)
                if entry.get("usd") is not None:
                    self.usd_before += float(entry["usd"])
                elif entry.get("tokens"):
                    self.tokens_before = [
                        a + int(b)
                        for a, b in zip(self.tokens_before, entry["tokens"], strict=False)
                    ]
                if entry.get("tokens"):
                    self.billed_before = [
                        a + int(b)
                        for a, b in zip(self.billed_before, entry["tokens"] + [1], strict=False)
                    ]
                if entry.get("key") is not None and entry.get("p_yes") is not None:
                    self.cache[entry["key"]] = entry["p_yes"]
                    if entry.get("text"):
                        self.from_text.add(entry["key"])
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                pass  # a line cut short by a crash: that judgement is simply asked again

    def key(self, prompt):
        return hashlib.sha256(f"{self.model}\n{prompt}".encode()).hexdigest()

    def ask(self, prompt):
        """P(yes) for one prompt, from the cache or the endpoint; raises
        JudgeError after the retries."""
        key = self.key(prompt)
        if key in self.cache:
            return self.cache[key]
        reserve = self.reserve(prompt)
        try:
            return self.ask_endpoint(key, prompt)
        finally:
            with self.lock:
                self.reserved -= reserve

    def spent_usd(self):
        """USD the run's judge has paid, earlier processes (the cache file) and
        this one; None without a price."""
        now = judge_cost_usd(
            self.model,
            self.tokens_before[0] + self.tokens[0],
            self.tokens_before[1] + self.tokens[1],
            self.price,
        )
        return None if now is None else self.usd_before + now

    def reserve(self, prompt):
        """Book the estimated cost of one request against max_usd, or raise JudgeBudgetExceeded when
        the money the run has spent plus the requests in flight plus this one would pass it."""
        if not self.max_usd or self.spent_usd() is None:
            return 0.0
        # the estimate, or the mean billed so far (by the run) if larger: it is approximate
        with self.lock:
            paid = max(1, self.paid_requests + self.billed_before[2])
            mean_in, mean_out = ((self.tokens[i] + self.billed_before[i]) / paid for i in (0, 1))
            cost = judge_cost_usd(
                self.model, max(approx_tokens(prompt), mean_in), max(1, mean_out), self.price
            )
            if self.spent_usd() + self.reserved + cost > self.max_usd:
                raise JudgeBudgetExceeded(
                    f"the run's judge has spent ${self.spent_usd():.4f} (this and earlier "
                    f"runs); one more request would pass --judge-max-usd {self.max_usd}"
                )
            self.reserved += cost
        return cost

    def ask_endpoint(self, key, prompt):
        """P(yes) from the endpoint; JudgeError naming the last failure
        once the retries are used up."""
        last = None
        unusable = 0
        for attempt in range(self.max_retries + 1):
            try:
                p_yes, usage, from_text = self.request(prompt)
            except UnusableReply as e:  # paid for, so recorded; asked again at once, a few times
                self.record(usage=e.usage, unusable=e.reply)
                last = e
                unusable += 1
                if unusable > UNUSABLE_RETRIES:
                    break
                continue
            except (
                self.openai.RateLimitError,
                self.openai.APITimeoutError,
                self.openai.APIConnectionError,
                self.openai.InternalServerError,
                self.openai.APIResponseValidationError,
                JudgeError,
                ValueError,
            ) as e:  # ValueError: a body that is not JSON
                last = e
            except self.openai.APIStatusError as e:
                if e.status_code < 500:
                    raise JudgeError(f"judge endpoint refused the request: {e}") from e
                last = e
            else:
                self.record(key, usage, p_yes, from_text)
                return p_yes
            if attempt < self.max_retries:
                time.sleep(self.wait_after(last, attempt))
        raise JudgeError(f"gave up after {attempt + 1} attempts: {type(last).__name__}: {last}")

    def wait_after(self, error, attempt):
        """Seconds to wait after a failed attempt (see RETRY_AFTER_CAP_S); said in
        the log every 10 s at most."""
        asked = retry_after_s(getattr(error, "response", None))
        if asked is not None:
            wait = min(asked, RETRY_AFTER_CAP_S)
            self.say(
                "wait",
                f"[feedback] judge: {type(error).__name__}; waiting {wait:.0f} s as the endpoint's "
                f"Retry-After asks ({asked:.0f} s; capped at {RETRY_AFTER_CAP_S:.0f} s)",
            )
            # the threads do not all come back at the same instant
            return wait * (1 + 0.1 * random.random())
        # with jitter
        wait = min(BACKOFF_CAP_S, self.backoff * 2**attempt * (0.5 + random.random()))
        self.say(
            "wait",
            f"[feedback] judge: {type(error).__name__}: {error}; asking again in {wait:.1f} s "
            f"(attempt {attempt + 2} of {self.max_retries + 1})",
        )
        return wait

    def say(self, kind, message, every=10.0):
        """Log `message` unless one of its kind was logged less than `every` seconds ago."""
        with self.lock:
            if time.time() - self.said.get(kind, float("-inf")) < every:
                return
            self.said[kind] = time.time()
        self.log(message)

    def record(self, key=None, usage=(0, 0), p_yes=None, from_text=False, unusable=None):
        """Count one paid reply and append it to the cache file. Append-only: a judgement is never
        lost, and the next process knows what the run has spent (--judge-max-usd counts it)."""
        entry = dict(key=key, p_yes=p_yes, text=from_text) if key else dict(unusable=unusable)
        entry.update(tokens=list(usage), usd=judge_cost_usd(self.model, *usage, self.price))
        with self.lock:
            self.tokens[0] += usage[0]
            self.tokens[1] += usage[1]
            self.paid_requests += 1
            if key:
                self.cache[key] = p_yes
                if from_text:
                    self.from_text.add(key)
            if self.cache_file:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_file, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if from_text:
            self.say(
                "text",
                f"[feedback] WARNING: {self.name} sent no log-probabilities of Yes/No: P(yes) is 0 "
                "or 1, read from the reply's text; counted in feedback/done.json (p_yes_from_text)",
                every=float("inf"),
            )

    def request(self, prompt):
        r = self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        return reply_p_yes(r)

    def api_entry(self, answer):
        i = self.db.match(answer_api_call(answer))
        return self.db.apis[i] if i is not None else None

    def answers(self, record, answer):
        """{question: P(yes)} for one answer. At the first question the judge gives up on, the rest
        are not asked (the answer has no score either way, and a dead endpoint costs one question's
        retries per answer, not six): those are None, and "error" says why."""
        entry = self.api_entry(answer)
        out = {}
        for key, question, _ in QUESTIONS:
            try:
                out[key] = self.ask(judge_prompt(record.instruction, answer, entry, question))
            except JudgeError as e:
                return dict({k: out.get(k) for k, _, _ in QUESTIONS}, error=str(e))
        return out

    def text_judgements(self, record, answer):
        """How many of the answer's questions have a P(yes) read from the reply's
        text (no log-probabilities)."""
        entry = self.api_entry(answer)
        return sum(
            self.key(judge_prompt(record.instruction, answer, entry, q)) in self.from_text
            for _, q, _ in QUESTIONS
        )

    def cost(self):
        usd = self.spent_usd()
        return f"{self.tokens[0]:,} prompt + {self.tokens[1]:,} completion tokens" + (
            f", ${usd:.4f} spent by the run" if usd is not None else ""
        )


def judged_so_far(out_file):
    """{sample id: feedback record} of a partial feedback file; a line cut short by a crash, or a
    row without a score (written by older versions when the judge gave up), is skipped: that
    answer is simply judged again."""
    done = {}
    if Path(out_file).exists():
        for line in Path(out_file).read_text().splitlines():
            try:
                row = Feedback(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            if row.score is not None:
                done[row.id] = row
    return done


def judge_answers(judge, samples, records, out_file, concurrency=1, log=log):
    """Judge every Sample; each Feedback is appended to out_file once it has a score, and
    samples already there are skipped, so an interrupted run resumes without re-asking (the
    judge's cache also keeps every question answered about the others). Returns every sample's
    Feedback, each with a score, or raises JudgeFailed: an answer the judge gave up on is not
    written, and after max(concurrency, 3) of them in a row (a dead endpoint, a judge that never
    says Yes or No) no new answer is started."""
    out_file = Path(out_file)
    done = judged_so_far(out_file)
    todo = [s for s in samples if s.id not in done]
    before = len(done)
    stop_after = max(concurrency, 3)
    log(f"[feedback] judge: {judge.name}; {len(done)} judged already, {len(todo)} to go")
    lock = threading.Lock()
    t0 = time.time()
    stop = threading.Event()  # set: no new answer is started
    failed = []  # the Feedback of answers the judge gave up on
    streak = [0]  # answers given up on in a row (a list: the threads update it)

    def judge_one(sample):
        if stop.is_set():
            return
        try:
            result = feedback_of(judge, sample, records[sample.record])
        except BaseException:
            stop.set()  # JudgeBudgetExceeded, say: the answers not started are not asked
            raise
        with lock:
            if result.score is None:
                failed.append(result)
                streak[0] += 1
                if streak[0] >= stop_after:
                    stop.set()
                return
            streak[0] = 0
            with open(out_file, "a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            done[sample.id] = result
            n = len(done)
            if n % 100 == 0 or n == len(samples):
                cost = f", {judge.cost()}" if hasattr(judge, "cost") else ""
                eta = progress(n - before, len(samples) - before, t0)
                log(f"[feedback] {n}/{len(samples)} judged{cost} {eta}")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        list(pool.map(judge_one, todo))
    refuse_unscored(samples, done, failed, len(done) == before, stop_after)
    return [done[s.id] for s in samples]


def feedback_of(judge, sample, record):
    """The judge's Feedback on one sample; its score is None where the judge gave up."""
    answers = judge.answers(record, sample.answer)
    error = answers.pop("error", None)
    return Feedback(
        id=sample.id,
        record=sample.record,
        source=sample.source,
        judge=judge.name,
        answers=answers,
        score=combine(answers),
        error=error,
    )


def refuse_unscored(samples, done, failed, none_scored, stop_after):
    """Raise JudgeFailed, saying why, if a sample has no score."""
    missing = sum(s.id not in done for s in samples)
    if not missing:
        return
    last = failed[-1].error if failed else "no answer"
    if none_scored:
        raise JudgeFailed(
            f"the judge scored none of the {len(failed)} answer(s) it was asked ({missing} of "
            f"{len(samples)} have no score); the last: {last}"
        )
    rest = missing - len(failed)
    raise JudgeFailed(
        f"{missing} of {len(samples)} answers have no score: the judge gave up on "
        f"{len(failed)} (the last: {last})"
        + (f", and {rest} were not asked after {stop_after} failures in a row" if rest else "")
    )


# -----------------------------------------------------------------------------
# The reward model

# [not in the paper] The answers a contrast answer (rlaif.contrast_answers) is compared
# with. Another domain's reference is compared only with this prompt's reference: the two
# differ in relevance alone. Against the policy's own answers it wins on its (runnable,
# real) code, so those pairs taught that a foreign domain wins (docs/experiments.md, "Where
# the reward model's ranking fails").
CONTRAST_PARTNERS = {"mismatched": {"reference"}}


def comparable(a, b):
    """Whether two answers to one prompt may form a pair: a source CONTRAST_PARTNERS names is
    compared only with the sources it lists; the others with any answer."""
    return b.source in CONTRAST_PARTNERS.get(
        a.source, {b.source}
    ) and a.source in CONTRAST_PARTNERS.get(b.source, {a.source})


def make_pairs(feedback, max_contrast_pairs, rng):
    """(better id, worse id) pairs within each prompt, ordered by judge score; ties are dropped.
    Every pair of the policy's own answers is kept: they are what PPO asks the reward model to rank.
    Pairs with a contrast answer (rlaif.contrast_answers) are capped at max_contrast_pairs per
    prompt, so that they teach relevance and missing code without outnumbering the policy's
    comparisons, and are made only between answers that CONTRAST_PARTNERS lets be compared."""
    by_record = {}
    for f in feedback:
        if f.score is not None:
            by_record.setdefault(f.record, []).append(f)
    pairs = []
    for group in by_record.values():
        ordered = [(a, b) for a in group for b in group if a.score > b.score and comparable(a, b)]
        own = [(a.id, b.id) for a, b in ordered if a.source == b.source == "policy"]
        contrast = [(a.id, b.id) for a, b in ordered if not a.source == b.source == "policy"]
        rng.shuffle(contrast)
        pairs.extend(own + contrast[:max_contrast_pairs])
    return pairs


# -----------------------------------------------------------------------------
# What the reward model gets right, pair by pair (the diagnostics of docs/experiments.md)

MARGIN_BINS = (0.1, 0.3)  # judge-score differences: small (< 0.1), medium, large (>= 0.3)


def pair_kind(a, b):
    """'policy-policy', 'policy-reference', 'mismatched-reference', ...: the
    sources of a pair's answers."""
    return "-".join(sorted((a.source, b.source)))


def separating_question(a, b):
    """The judge question that contributes most to the two answers' score difference."""

    def gap(q):
        return q[2] * abs((a.answers.get(q[0]) or 0.0) - (b.answers.get(q[0]) or 0.0))

    return max(QUESTIONS, key=gap)[0]


def margin_bin(a, b):
    d = abs(a.score - b.score)
    return "<0.1" if d < MARGIN_BINS[0] else "0.1-0.3" if d < MARGIN_BINS[1] else ">=0.3"


def pair_accuracy(scores, feedback, pairs, prefix):
    """{prefix/accuracy, prefix/pairs, prefix/kind/K, prefix/question/Q, prefix/margin/M}: the share
    of (better, worse) `pairs` that `scores` ({id: score}) order as the judge does; pairs the scores
    tie count as wrong. feedback: {id: Feedback}."""
    groups = {}
    for a, b in pairs:
        fa, fb = feedback[a], feedback[b]
        right = float(scores[a] > scores[b])
        for key in (
            "accuracy",
            f"kind/{pair_kind(fa, fb)}",
            f"question/{separating_question(fa, fb)}",
            f"margin/{margin_bin(fa, fb)}",
        ):
            groups.setdefault(key, []).append(right)
    out = {f"{prefix}/{k}": sum(v) / len(v) for k, v in sorted(groups.items())}
    out[f"{prefix}/pairs"] = len(pairs)
    return out


# -----------------------------------------------------------------------------
# What the reward model reads: the answer, then a tool's report on it [not in the paper]

REPORT_TOKENS = (
    64  # the report is cut to this many tokens; rlaif.py leaves room for it in the context
)


def tool_report(answer, db):
    """[not in the paper] A tool-augmented reward model (Li et al. 2024, "Tool-Augmented Reward
    Modeling"): after the answer, the reward model reads what a lookup in the API database and
    a Python parser say about it: whether the code parses, how many model ids of the api_call
    and of the code no entry names, and the entry the api_call makes (APIDatabase.match): its
    domain and call. A documented call shape with an invented model id is no entry (as in
    RulesJudge): with Gorilla's lenient match alone, PPO learned pipeline('<task>',
    model='<invented>') (docs/experiments.md). A small network cannot remember which of 936
    APIs and thousands of model ids exist, so its ranking of the policy's answers stayed near
    chance; it can read a line that says so."""
    sections = prepare.parse_answer(answer)
    api_call = answer_api_call(answer)
    unknown_call = set(db.unknown_model_ids(api_call))
    unknown_code = set(db.unknown_model_ids(sections["code"]))
    i = db.match(api_call) if not unknown_call else None
    entry = f"{db.apis[i]['domain']} | {db.apis[i]['api_call']}" if i is not None else "none"
    parses = "yes" if python_parses(sections["code"]) else "no"
    return (
        f"\n### Tool: code parses {parses}, unknown model ids: api_call {len(unknown_call)}, "
        f"code {len(unknown_code)}, API entry: {entry}\n"
    )


def python_parses(code):
    try:
        return bool(code.strip()) and ast.parse(code) is not None
    except (SyntaxError, ValueError):
        return False


def with_report(tok, response, db):
    """An answer's token ids followed by its tool report's (cut to REPORT_TOKENS)."""
    text = tok.decode([t for t in response if t != tok.eot])
    return list(response) + tok.encode(tool_report(text, db))[:REPORT_TOKENS]


def reading_reports(samples, tok, db):
    """{id: Sample} whose responses carry their tool reports: what the reward
    model trains and is measured on."""
    return {
        i: dataclasses.replace(s, response=with_report(tok, s.response, db))
        for i, s in samples.items()
    }


def load_reward_model(path, tok, device):
    """(reward model, its score_fn for PPO and best-of-n): score_fn(query,
    query_mask, response, response_mask) appends each response's tool report first
    when the model was trained reading them."""
    rm, ckpt = ScalarModel.load(path, device)
    if not ckpt.get("tools"):
        return rm, rm.score
    db = APIDatabase()

    def score(query, query_mask, response, response_mask):
        rows = [
            [t for t, m in zip(r, r_mask, strict=True) if m]
            for r, r_mask in zip(response.tolist(), response_mask.tolist(), strict=True)
        ]
        response, response_mask = right_pad(
            [with_report(tok, r, db) for r in rows], tok.eot, response.device
        )
        return rm.score(query, query_mask, response, response_mask)

    return rm, score


# -----------------------------------------------------------------------------
# The reward model's training: judge-ordered pairs, Bradley-Terry


def pair_batches(samples, pairs, batch_size, epochs, seed):
    """Every step's batch of (id, id) `pairs` of `samples` for `epochs` passes, fixed up
    front so that a resumed run trains on the same batches; length-grouped (the reward
    model's and DPO's batches)."""
    keys = [
        (len(samples[a].query) // 16, max(len(samples[a].response), len(samples[b].response)))
        for a, b in pairs
    ]
    # Under torchrun the last, short batch of an epoch is dropped, so that
    # every rank has pairs in every step.
    return [
        batch
        for epoch in range(epochs)
        for batch in length_grouped_batches(
            keys,
            batch_size,
            shuffle_seed=stream_seed(seed, 7919, epoch),
            batch_seed=stream_seed(seed, 31, epoch),
            drop_last=DIST.world > 1,
        )
    ]


def rm_batch(samples, ids, tok, device):
    return pad_pairs([(samples[i].query, samples[i].response) for i in ids], tok.eot, device)


def comparisons_loss(
    rm, samples, pairs, tok, device, targets=None, aux_weight=0.0, stats=None, margins=None
):
    """Mean Bradley-Terry loss -log sigmoid(r_better - r_worse) over `pairs`, with one forward pass
    per distinct answer of the batch (InstructGPT, Ouyang et al. 2022, section 3.5: K answers give
    up to K(K-1)/2 comparisons for K passes). With aux_weight > 0, plus aux_weight x the binary
    cross-entropy of the per-question logits against the judge's answers, targets: {id: [P(yes) per
    QUESTIONS]}. [not in the paper] The scalar comparisons tell the model which answer won, not why;
    the six answers say why (a dense target for every answer). margins: {pair: margin} or None.
    stats: a dict to receive the batch's pairwise accuracy and, with targets, each question's
    accuracy (logit > 0 against P(yes) > 0.5), for the metrics."""
    ids = sorted({i for pair in pairs for i in pair})
    at = {i: k for k, i in enumerate(ids)}
    r, aux = rm.score_and_aux(*rm_batch(samples, ids, tok, device))
    better = torch.tensor([at[a] for a, _ in pairs], device=r.device)
    worse = torch.tensor([at[b] for _, b in pairs], device=r.device)
    # Llama 2's margin (Touvron et al. 2023, eq. 2): a pair the judge separates widely must be
    # separated by at least that margin; a close call asks for less.
    margin = torch.tensor([margins[p] for p in pairs], device=r.device) if margins else 0.0
    # every rank's pairs under torchrun
    loss = global_mean(-F.logsigmoid(r[better] - r[worse] - margin))
    if stats is not None:
        stats["accuracy"] = global_mean((r[better] > r[worse]).float()).item()
    if aux is not None and targets:
        y = torch.tensor([targets[i] for i in ids], device=aux.device, dtype=torch.float32)
        if aux_weight:
            loss = loss + aux_weight * global_mean(
                F.binary_cross_entropy_with_logits(aux.float(), y, reduction="none")
            )
        if stats is not None:
            right = ((aux.float() > 0) == (y > 0.5)).float().mean(0).tolist()
            stats.update(
                {f"accuracy_{k}": a for (k, _, _), a in zip(QUESTIONS, right, strict=True)}
            )
    return loss


def question_targets(feedback):
    """{sample id: [P(yes) for each of QUESTIONS]} of every fully answered sample."""
    return {f.id: [f.answers[k] for k, _, _ in QUESTIONS] for f in feedback if f.score is not None}


@torch.no_grad()
def rm_scores(rm, samples, ids, tok, device, batch_size=32):
    rm.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        with autocast(device):
            out.append(rm.score(*rm_batch(samples, ids[i : i + batch_size], tok, device)).float())
    return torch.cat(out) if out else torch.zeros(0)


def split_prompts(feedback, cfg, seed):
    """(held-out, validation) sets of training-split record ids; the rest trains. Held-out prompts
    only measure (the number the docs report); validation prompts choose the step that is kept."""
    rng = random.Random(seed)
    records = sorted({f.record for f in feedback})
    rng.shuffle(records)
    n_held = max(1, int(len(records) * cfg.heldout_fraction))
    n_val = int(len(records) * cfg.val_fraction)
    return set(records[:n_held]), set(records[n_held : n_held + n_val]), rng


def policy_pairs(feedback, records, rng):
    """Judge-ordered pairs of the policy's own answers to `records`: what
    PPO asks the reward model."""
    fb = [
        f for f in feedback if f.record in records and f.score is not None and f.source == "policy"
    ]
    return fb, make_pairs(fb, 0, rng)


def measure(rm, samples, feedback, sets, tok, device):
    """Pairwise accuracy of rm on each named (Feedback rows, pairs) set, by
    kind, question and margin."""
    out = {}
    by_id = {f.id: f for f in feedback}
    for name, (_rows, pairs) in sets.items():
        ids = sorted({i for pair in pairs for i in pair})
        scores = dict(zip(ids, rm_scores(rm, samples, ids, tok, device).tolist(), strict=True))
        out.update(pair_accuracy(scores, by_id, pairs, name))
    return out


def train_reward_model(
    rm, samples, feedback, tok, cfg, seed, grad_clip, device, ckpt_file, log=log
):
    """Train on judge-ordered pairs (Bradley-Terry); returns held-out metrics. samples: {id:
    runs.Sample}. Every eval_every steps (and at step 0) it measures the held-out and validation
    prompts' pairs; the trained step with the best validation accuracy is the one kept."""
    train_fb, train_pairs, sets = training_pairs(feedback, cfg, seed, log)
    targets = question_targets(train_fb) if rm.aux is not None else {}
    judge_scores = {f.id: f.score for f in train_fb}
    rm.freeze_below(cfg.train_blocks)
    # Every step's batch, fixed up front so a resumed run trains on the same batches. Pairs from
    # many prompts per batch, not one prompt's comparisons (InstructGPT's faster layout), which
    # generalised worse to new prompts (docs/experiments.md, "The reward model's batches");
    # length grouping keeps padding low.
    order = pair_batches(samples, train_pairs, cfg.batch_size, cfg.epochs, seed)
    steps = len(order)
    log(f"[reward] {steps} steps of {cfg.batch_size} pairs")
    optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    best_file = Path(ckpt_file).with_name("best.pt")
    metrics_file = Path(ckpt_file).parent / "metrics.jsonl"
    step, history, ckpt = resume(ckpt_file, device, optimizer, "reward", log, model=rm)
    best = ckpt.get("best", (-1.0, 0))  # (validation accuracy, step) kept so far
    t0, start = time.time(), step
    while True:
        if step % cfg.eval_every == 0 or step == steps:
            history.append(dict(step=step, **measure(rm, samples, feedback, sets, tok, device)))
            validated = bool(sets["val"][1])
            best = keep_if_best(rm, history[-1], best, best_file, validated, log, steps == 0)
        if step == steps:
            break
        batch = [train_pairs[i] for i in order[step]]
        stats = train_step(
            rm, samples, batch, judge_scores, targets, optimizer, tok, cfg, grad_clip, device
        )
        step += 1
        check_loss(stats["loss"], "reward", f"step {step}", "--rm-lr and --rm-margin")
        history.append(dict(step=step, lr=cfg.lr, **stats))
        if step % 20 == 0 or step == steps:
            eta = progress(step - start, steps - start, t0)
            log(f"[reward] step {step}/{steps} loss {stats['loss']:.4f} {eta}")
            if is_main():
                state = dict(optimizer=optimizer.state_dict(), step=step, history=history)
                rm.save(ckpt_file, **state, best=best)
                # from the checkpointed history: no row twice after a resume
                write_metrics(metrics_file, history)
    barrier()
    return kept_model(rm, history, best, best_file, metrics_file, steps, device, log)


def training_pairs(feedback, cfg, seed, log=log):
    """(training prompts' feedback, their judge-ordered pairs, the measured sets): held-out and
    validation prompts' policy pairs, and a fixed slice of the training pairs (to see
    overfitting)."""
    heldout, val, rng = split_prompts(feedback, cfg, seed)
    measured_only = heldout | val
    train_fb = [f for f in feedback if f.record not in measured_only]
    train_pairs = make_pairs(train_fb, cfg.max_contrast_pairs, rng)
    sets = dict(
        heldout=policy_pairs(feedback, heldout, rng),
        val=policy_pairs(feedback, val, rng),
        train=(train_fb, train_pairs[:512]),
    )
    require_items(
        train_pairs,
        "reward",
        "judge-ordered training pairs",
        f"{len(measured_only)} prompts held out or validating left none to train on: lower "
        "--rm-heldout-fraction or --rm-val-fraction"
        if not train_fb
        else "every answer to a training prompt got the same score: train SFT longer "
        "(--sft-steps) or sample more answers per instruction (--answers-per-instruction)",
    )
    log(
        f"[reward] {len(train_pairs)} train pairs, {len(sets['heldout'][1])} held-out pairs "
        f"({len(heldout)} prompts), {len(sets['val'][1])} validation pairs ({len(val)} prompts)"
    )
    return train_fb, train_pairs, sets


def kept_model(rm, history, best, best_file, metrics_file, steps, device, log=log):
    """Load the kept step's weights into rm; its held-out metrics, also appended to the
    metrics."""
    # its own step: a crash may have left `best` older
    kept_ckpt = load_checkpoint(best_file, device)
    rm.load_state_dict(kept_ckpt["model"])
    best = (kept_ckpt.get("val_accuracy", best[0]), kept_ckpt["step"])
    kept = next(r for r in history if r["step"] == best[1] and "heldout/pairs" in r)
    log(f"[reward] kept step {best[1]} (validation accuracy {best[0]:.3f})")
    heldout_metrics = dict(
        kept_step=best[1],
        heldout_pairwise_accuracy=kept.get("heldout/accuracy", 0.0),
        heldout_pairs=kept["heldout/pairs"],
        val_pairwise_accuracy=best[0],
    )
    if is_main():
        write_metrics(metrics_file, history + [dict(step=steps, **heldout_metrics)])
    return heldout_metrics


def keep_if_best(rm, row, best, best_file, validated, log, untrained_ok=False):
    """Log a measured row; save the model to best_file if its validation accuracy beats best =
    (accuracy, step). Without validation pairs, the last step is kept. Every rank keeps the same
    tuple. Step 0's head is random: it is kept only when there is no training step (seed 3 kept it
    by noise, docs/experiments.md)."""
    log(
        f"[reward] step {row['step']}: pairwise accuracy held-out "
        f"{row.get('heldout/accuracy', 0):.3f}, "
        f"validation {row.get('val/accuracy', 0):.3f}, train {row.get('train/accuracy', 0):.3f}"
    )
    if row["step"] == 0 and not untrained_ok:
        return best
    if row.get("val/accuracy", 0.0) > best[0] or not validated:
        best = (row.get("val/accuracy", 0.0), row["step"])
        if is_main():
            rm.save(best_file, step=row["step"], val_accuracy=best[0])
    return best


def train_step(rm, samples, pairs, scores, targets, optimizer, tok, cfg, grad_clip, device):
    """One optimizer step on a batch of pairs (this rank's share under torchrun); returns its stats.
    scores: {id: judge score}, for the margin."""
    rm.train()
    stats = {}
    margins = (
        {(a, b): cfg.margin * (scores[a] - scores[b]) for a, b in pairs} if cfg.margin else None
    )
    with autocast(device):
        loss = comparisons_loss(
            rm, samples, shard(pairs), tok, device, targets, cfg.aux_weight, stats, margins
        )
    loss.backward()
    average_gradients([p for p in rm.parameters() if p.requires_grad])
    torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss.item(), **stats)


def normalise(rm, samples, ids, tok, device):
    """Set gain/bias so rewards on SFT samples have mean 0 and std 1 (lm-human-preferences)."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    r = rm_scores(rm, samples, ids, tok, device)
    rm.gain.fill_(1.0 / (r.std().item() + 1e-8))
    rm.bias.fill_(-r.mean().item() / (r.std().item() + 1e-8))


# -----------------------------------------------------------------------------
# The same feedback used without training a reward model [not in the paper] (rlaif.py --compare)


def judge_score_fn(judge, records, tok, feedback):
    """d-RLAIF ("direct RLAIF", Lee et al. 2023): the judge scores each PPO rollout itself, with no
    reward model in between. Scores are normalised as the reward model's are: mean 0, std 1 over the
    SFT samples' judge scores. A PPO score_fn (see ppo.train_ppo)."""
    scores = [f.score for f in feedback if f.source == "policy" and f.score is not None]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) + 1e-8
    by_prompt = {tuple(prepare.prompt_ids(tok, r.instruction)): r for r in records}

    def score(query, query_mask, response, response_mask):
        out = []
        for q, q_mask, r, r_mask in zip(
            query.tolist(),
            query_mask.tolist(),
            response.tolist(),
            response_mask.tolist(),
            strict=True,
        ):
            record = by_prompt[tuple(t for t, m in zip(q, q_mask, strict=True) if m)]
            s = judge_score(
                judge, record, tok.decode([t for t, m in zip(r, r_mask, strict=True) if m])
            )
            out.append((s - mean) / std)
        return torch.tensor(out, device=query.device)

    return score


def best_of_n(scores, n):
    """Index of the best-scored answer in each consecutive group of n (the first, on ties)."""
    return [max(range(i, i + n), key=lambda j: scores[j]) for i in range(0, len(scores), n)]


# -----------------------------------------------------------------------------
# The judge of a run: which one, and what stops it from working (checked before any stage runs)


def judge_base_url(base_url):
    return base_url or os.environ.get("OPENAI_BASE_URL", "")


# The probe's question has one right answer, so a judge that cannot say Yes to it cannot
# judge at all. [connection check] at its start keeps it apart from the judge's prompts
# (a test server counts it apart).
PROBE_PROMPT = "[connection check] Is 2 + 2 equal to 4? Answer with a single word, Yes or No."


def probe_judge(base_url, model, timeout=30.0, log=log):
    """One request of one output token, before any stage: does the endpoint answer, take the key,
    serve the model and say Yes or No? A problem line naming the URL and the model, or None. Whether
    log-probabilities came back is logged (without them P(yes) is 0 or 1: reply_p_yes)."""
    import openai

    where = f"the judge endpoint {base_url or 'https://api.openai.com/v1'} (--judge-model {model})"
    client = openai.OpenAI(
        api_key=judge_api_key(base_url), base_url=base_url or None, timeout=timeout, max_retries=0
    )
    try:
        _, _, from_text = reply_p_yes(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROBE_PROMPT}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=5,
            )
        )
    # it answers; the judge's retries wait for it, unless the money is gone
    except openai.RateLimitError as e:
        if "insufficient_quota" in str(e):
            return f"{where}: no quota left (429 insufficient_quota)"
        log(
            f"[rlaif] judge probe: {where} is rate-limited (429) now; the judge will wait as it "
            "asks"
        )
        return None
    except openai.NotFoundError as e:
        return f"{where}: 404, the model is not served there, or the URL does not end in /v1 ({e})"
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        return f"{where}: the key was refused ({e.status_code}); check OPENAI_API_KEY"
    except openai.APIStatusError as e:
        return f"{where}: HTTP {e.status_code} to one request ({str(e)[:200]})"
    except openai.APIConnectionError as e:  # time-outs too
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return f"{where}: unreachable, {type(e).__name__}: {e}{cause}. Is the server running?"
    except UnusableReply as e:
        return f"{where}: asked {PROBE_PROMPT!r}, {e}: it cannot answer the judge's questions"
    except (JudgeError, ValueError, openai.APIResponseValidationError) as e:  # ValueError: not JSON
        return f"{where}: not an OpenAI chat completion ({e})"
    log(
        f"[rlaif] judge probe: {where} answers "
        + (
            "WITHOUT log-probabilities: P(yes) will be 0 or 1 (counted in feedback/done.json)"
            if from_text
            else "with log-probabilities"
        )
    )
    return None


def judge_problems(base_url, model="gpt-3.5-turbo", log=log):
    """What stops the OpenAI-compatible judge from working, found before any stage runs: no key, or
    the endpoint, the key or the model failing one cheap request (probe_judge)."""
    base_url = judge_base_url(base_url)
    if not base_url and not os.environ.get("OPENAI_API_KEY"):
        return [
            "--judge openai: set OPENAI_API_KEY (api.openai.com), or --judge-base-url / "
            "OPENAI_BASE_URL for a "
            "local OpenAI-compatible server (vLLM, Ollama: no key needed); --judge rules is the "
            "offline stand-in"
        ]
    problem = probe_judge(base_url, model, log=log)
    return [problem] if problem else []


def make_judge(kind, model, base_url, cache_file, max_usd=0.0, log=log, price=""):
    """The judge of a run; price: --judge-price's text (judge_price)."""
    if kind == "rules":
        return RulesJudge()
    return OpenAIJudge(
        model,
        judge_base_url(base_url),
        cache_file=cache_file,
        max_usd=max_usd,
        price=judge_price(model, price),
        log=log,
    )


# -----------------------------------------------------------------------------
# The stages of a run (rlaif.py): 4. AI feedback on the samples, 5. the reward model


def run_judge(cfg, run):
    """The judge a run's settings name, with the run's cache (cost and answers) and spending cap."""
    return make_judge(
        cfg.judge,
        cfg.judge_model,
        cfg.judge_base_url,
        run / RUN_FILES["judge_cache"],
        cfg.judge_max_usd,
        log=log,
        price=cfg.judge_price,
    )


def feedback_stage(cfg, run, splits):
    """Stage 3: the judge answers the questions about every sampled answer (run_dir/sample); its
    Feedback rows go to run_dir/feedback. Done only when every answer has a score: an answer the
    judge could not score stops the stage with a count and the command that resumes it. Resumable:
    answers already judged are in the partial file, and every answered question in the judge's
    cache; a rerun asks only for the rest."""
    judge = run_judge(cfg, run)
    samples = read_rows(run / RUN_FILES["samples"], Sample)
    partial = run / RUN_FILES["feedback_partial"]
    announce_judge(cfg, judge, samples, partial, splits["train"])
    kept = f"What was judged is kept ({partial}, {run / RUN_FILES['judge_cache']})"
    concurrency = cfg.judge_concurrency if cfg.judge == "openai" else 1
    try:
        feedback = judge_answers(judge, samples, splits["train"], partial, concurrency, log=log)
    except JudgeBudgetExceeded as e:
        raise SystemExit(
            f"[feedback] stopped: {e}. {kept}; rerun with a higher --judge-max-usd to resume."
        ) from None
    except JudgeFailed as e:
        raise SystemExit(
            f"[feedback] not done: {e}. {kept}; python rlaif.py --run-dir {run} resumes, asking "
            "only for what is missing."
        ) from None
    log_feedback(feedback)
    write_rows(run / RUN_FILES["feedback"], feedback)
    summary = dict(judge=judge.name, judged=len(feedback))
    if cfg.judge == "openai":
        summary.update(
            p_yes_from_text=p_yes_from_text(judge, feedback, samples, splits["train"]),
            judge_usd=None if judge.spent_usd() is None else round(judge.spent_usd(), 6),
        )
    return summary


def announce_judge(cfg, judge, samples, partial, records):
    """Say which judge grades the answers; for a paid one, what it will cost before the first
    request (what the run has spent counts), refused above --judge-max-usd."""
    if cfg.judge == "rules":
        log(
            "[feedback] NOTE: the RULES JUDGE (deterministic checks) stands in for the paper's "
            "GPT-3.5 judge; this is not LLM feedback. Use --judge openai for AI feedback."
        )
        return
    judged = judged_so_far(partial)
    spent = judge.spent_usd()
    todo = [s for s in samples if s.id not in judged]
    plan = judge_plan(cfg.judge_model, todo, records, judge.db, judge.price)
    log(
        f"[feedback] judge {cfg.judge_model}: {plan_text(cfg.judge_model, *plan)} (cached "
        "answers free)" + (f"; the run has spent ${spent:.4f} on the judge so far" if spent else "")
    )
    if cfg.judge_max_usd and plan[3] is not None and spent + plan[3] > cfg.judge_max_usd:
        raise SystemExit(
            f"[feedback] the estimate (plus the ${spent:.4f} spent so far) passes "
            f"--judge-max-usd {cfg.judge_max_usd}: nothing was sent. Raise the cap, or judge "
            "fewer answers (--sampled-instructions, --answers-per-instruction)."
        )


def log_feedback(feedback):
    """Each source's mean score and mean P(yes) per question."""
    for source in sorted({f.source for f in feedback}):
        fb = [f for f in feedback if f.source == source]
        scores = [f.score for f in fb]
        means = ", ".join(
            f"{k} {sum(f.answers[k] for f in fb) / len(fb):.2f}" for k, _, _ in QUESTIONS
        )
        log(
            f"[feedback] {source} answers: mean score {sum(scores) / max(1, len(scores)):.3f} "
            f"over {len(scores)}; P(yes) per question: {means}"
        )


def p_yes_from_text(judge, feedback, samples, records):
    """{answers, judgements} whose P(yes) was read from the reply's text (no log-probabilities): 0
    or 1, not the paper's probability (reply_p_yes says why they are counted, not refused)."""
    answer = {s.id: s.answer for s in samples}
    per_answer = [judge.text_judgements(records[f.record], answer[f.id]) for f in feedback]
    counts = dict(answers=sum(n > 0 for n in per_answer), judgements=sum(per_answer))
    if counts["answers"]:
        log(
            f"[feedback] WARNING: {counts['judgements']} judgements of {counts['answers']} of "
            f"{len(feedback)} "
            "answers have P(yes) 0 or 1 from the reply's text (no log-probabilities)"
        )
    return counts


def reward_stage(cfg, run, splits):
    """Stage 4: the reward model, initialised from the SFT model, trained on the feedback,
    normalised on the policy's samples."""
    tok = prepare.tokenizer(cfg.compact)
    samples = {s.id: s for s in read_rows(run / RUN_FILES["samples"], Sample)}
    if cfg.rm.tools:
        samples = reading_reports(samples, tok, APIDatabase())
    torch.manual_seed(cfg.seed)
    rm = ScalarModel(GPT.from_pretrained(run / RUN_FILES["sft_model"]), len(QUESTIONS)).to(
        cfg.device
    )
    feedback = read_rows(run / RUN_FILES["feedback"], Feedback)
    metrics = train_reward_model(
        rm,
        samples,
        feedback,
        tok,
        cfg.rm,
        cfg.seed,
        cfg.grad_clip,
        cfg.device,
        run / "reward" / "ckpt.pt",
        log=log,
    )
    normalise(rm, samples, [i for i, s in samples.items() if s.source == "policy"], tok, cfg.device)
    if is_main():
        rm.save(run / RUN_FILES["reward_model"], tools=cfg.rm.tools)
    log(
        f"[reward] held-out pairwise accuracy {metrics['heldout_pairwise_accuracy']:.3f} "
        f"({metrics['heldout_pairs']} pairs) at the step kept, {metrics['kept_step']}"
    )
    return metrics


def main(argv=None):
    """python reward.py: the reward-model stage alone, on an existing run (default runs/tiny)."""
    cfg, run = stage_command_line(
        "reward",
        "Reward-model stage of a run of rlaif.py: train the reward model on the run's AI feedback "
        "(run_dir/feedback) and save it to run_dir/reward. Uses the run's recorded settings "
        "(config.json); the "
        "flags below override them and are recorded.",
        argv,
        section="rm",
        section_cls=RMConfig,
    )
    run_stage(cfg, run, "reward", reward_stage, prepare.load_splits(cfg.train_file))


if __name__ == "__main__":
    main()
