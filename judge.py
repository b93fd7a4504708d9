"""
AI feedback (Dutta et al. 2024, section 3.2): a judge answers fixed yes/no questions about each
sampled answer, seeing the instruction, the answer and the API database entry its api_call refers
to. Each question's answer becomes P(yes) (from the judge's log-probabilities of "Yes"/"No" when the
endpoint returns them, from its text otherwise, counted in feedback/done.json); the weighted sum of
the P(yes) is the answer's score in [0, 1]. The feedback stage is done only when every answer has a
score (judge_answers).
  - OpenAIJudge: GPT-3.5 (the paper) or any OpenAI-compatible server (vLLM, Ollama) by base_url,
    with its cache, cost and spending cap; probe_judge checks it before any stage runs.
  - RulesJudge: the offline stand-in. It answers the same questions with deterministic checks and
    labels every record "rules judge": it is NOT LLM feedback.
The reward model that learns the scores is in reward.py.

    python judge.py --run-dir runs/tiny --force    # redo the feedback stage of a run (see rlaif.py)
"""

import ast
import hashlib
import json
import math
import os
import random
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from config import stage_command_line
from data.gorilla import prepare
from data.gorilla.apis import (
    APIDatabase,
    answer_api_call,
    canonical_domain,
    library_names,
    squash,
    undefined_names,
)
from runs import (
    RUN_FILES,
    Sample,
    log,
    read_rows,
    run_alone,
    run_file,
    run_stage,
    write_rows,
)
from training import progress

# -----------------------------------------------------------------------------
# The questions and the score; what judging costs

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
    --judge-price that is not two finite numbers >= 0: float() reads "nan" and "inf", and a NaN or
    infinite price makes every cost NaN or inf, which no cap comparison ever stops."""
    if not price:
        return PRICE_PER_MTOK.get(model)
    try:
        pair = tuple(float(x) for x in price.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or not all(math.isfinite(x) and x >= 0 for x in pair):
        raise ValueError(
            f"--judge-price {price!r}: give USD per million input and output tokens, two finite "
            "numbers >= 0, e.g. 2.5,10"
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


# the row this stage writes, one for each runs.Sample (feedback/feedback.jsonl)
@dataclass
class Feedback:
    """The judge's verdict on one Sample (feedback/feedback.jsonl)."""

    id: int
    record: int
    source: str
    judge: str  # which judge answered (rules judge, or the LLM's name)
    answers: dict  # question -> P(yes) in [0, 1], or None where the judge gave no answer
    score: float  # judge.combine(answers); None when the judge gave up on this answer
    error: str = None


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
        """Parses as Python, reads no name that nothing binds (undefined_names: a NameError when
        run, which GPT-3.5, asked whether the code is valid, complete Python, would see), and every
        model id and pipeline task it names exists (static, not run)."""
        try:
            tree = ast.parse(code) if code.strip() else None
        except (SyntaxError, ValueError):
            return False
        if tree is None or self.db.unknown_model_ids(code) or undefined_names(code):
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
    """A reply that is neither Yes nor No, or whose log-probabilities are no probability: paid
    for, and no answer."""

    def __init__(self, reply, usage, why=None):
        super().__init__(why or f"the judge replied {reply!r}, neither Yes nor No")
        self.reply = reply
        self.usage = usage


class MalformedReply(JudgeError):
    """A 200 reply that is not a chat completion with a choice (an empty `choices` list, say)."""


class ReplyTooSlow(JudgeError):
    """No complete reply within the request's total deadline (within_deadline)."""


class JudgeFailed(Exception):
    """Answers left without a score: the feedback stage is not done
    (feedback_stage says how to resume)."""


# How long the judge waits before asking again, and why. A rate-limited endpoint says how long
# (Retry-After): the judge waits that long, but at most RETRY_AFTER_CAP_S (a server asking for an
# hour is asked again after two minutes, and again: the retries run out and the stage stops,
# resumable). Without a Retry-After (connection refused, 5xx, time-outs) the wait doubles from
# --backoff up to BACKOFF_CAP_S: about three minutes over the 8 retries, so a minute-long outage is
# waited out. A reply that is neither Yes nor No comes back fast and mostly the same again
# (temperature 0): it is asked again UNUSABLE_RETRIES times, at once. A 200 reply that is not a
# chat completion (no JSON, no choices) is a server bug, not an outage: it gets MALFORMED_TRIES
# tries in all, not minutes of backoff (15 answers x 9 tries took 387 s).
RETRY_AFTER_CAP_S = 120.0
BACKOFF_CAP_S = 60.0
UNUSABLE_RETRIES = 2
MALFORMED_TRIES = 2


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


def answer_word(text):
    """ "yes" or "no" when `text` is exactly that word once case, spaces and punctuation are trimmed
    ("Yes.", " no"), else None: "Not", "Nope" or "Yesterday" are no answer."""
    word = text.strip(string.whitespace + string.punctuation).lower()
    return word if word in ("yes", "no") else None


def logsumexp(values):
    """log(sum(exp(v))) without overflow: the largest is taken out first."""
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def p_yes_of_logprobs(candidates):
    """P(yes) from the first token's top log-probabilities [(token, logprob)], or None when no
    candidate is Yes or No. Each word's candidates (" Yes", "yes") are summed by log-sum-exp, and
    P(yes) = 1 / (1 + exp(lp_no - lp_yes)) is evaluated on the side where exp cannot overflow:
    finite in [0, 1] for any log-probabilities, both at -1e4 included (0.5; the plain exp/sum was
    0/0).
    ValueError for a log-probability that is not a number <= 0 (NaN, +1000: no probability), or
    when Yes and No both have probability 0."""
    words = {"yes": [], "no": []}
    for token, lp in candidates:
        if (word := answer_word(token or "")) is None:
            continue
        # 1e-3: servers round; a log-probability above 0 is a probability above 1
        if not isinstance(lp, (int, float)) or not lp <= 1e-3:  # `not <=`: NaN fails it too
            raise ValueError(f"log-probability {lp!r} of {token!r}")
        words[word].append(float(lp))
    if not words["yes"] and not words["no"]:
        return None
    yes, no = (logsumexp(words[w] or [-math.inf]) for w in ("yes", "no"))
    if yes == no == -math.inf:
        raise ValueError("Yes and No both have log-probability -inf")
    d = no - yes  # may be +-inf (one of them -inf): exp gives 0 or inf, the result 0 or 1
    return 1 / (1 + math.exp(d)) if d <= 0 else math.exp(-d) / (1 + math.exp(-d))


def reply_p_yes(r):
    """(P(yes), (prompt, completion) tokens, from_text) of a chat completion. P(yes) is the
    paper's: the log-probabilities of "Yes" and "No" renormalised over the two
    (p_yes_of_logprobs). UnusableReply if it is neither, or if the log-probabilities are no
    probability; MalformedReply if it is no chat completion with a choice.

    Missing log-probabilities are counted, not refused. Some OpenAI-compatible servers (local
    builds, proxies) return none; their Yes/No text still answers the question, as a P(yes)
    of 0 or 1. Refusing them would make those judges unusable; taking them silently would
    change what a score means (0 or 1 where the paper has a probability). So from_text marks
    them: the cache keeps the mark, the first one is logged, and feedback/done.json counts
    them per answer (p_yes_from_text). The text must be exactly Yes or No (answer_word)."""
    try:
        choice = r.choices[0]
        text = (choice.message.content or "").strip()
        usage = (r.usage.prompt_tokens, r.usage.completion_tokens) if r.usage else (0, 0)
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        top = [(t.token, t.logprob) for t in (content[0].top_logprobs or [])] if content else []
    except (AttributeError, IndexError, TypeError) as e:
        raise MalformedReply(
            f"malformed reply, not a chat completion with a choice ({type(e).__name__}: {e})"
        ) from e
    try:
        p_yes = p_yes_of_logprobs(top)
    except ValueError as e:
        why = (
            f"the judge replied {text[:80]!r} with log-probabilities that are no probability ({e})"
        )
        raise UnusableReply(text[:80], usage, why) from None
    if p_yes is not None:
        return p_yes, usage, False
    if (word := answer_word(text)) is None:
        raise UnusableReply(text[:80], usage)
    return float(word == "yes"), usage, True


def within_deadline(seconds, call):
    """call()'s result, or ReplyTooSlow once `seconds` have passed. httpx's timeout (the openai
    client's) is per read: a server that sends one byte every 5 s never trips a 30 s timeout and
    held a run for minutes. So the call runs in a daemon thread and is waited for `seconds` of wall
    clock at most; a thread left behind ends when its server stops sending (and never keeps the
    process alive), its reply is not used."""
    box = {}

    def run():
        try:
            box["reply"] = call()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ReplyTooSlow(f"no complete reply within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["reply"]


def ask_chat(client, model, prompt, timeout):
    """One judge request (one output token; the top 5 log-probabilities) under a total deadline of
    `timeout` seconds: reply_p_yes of the reply."""
    return reply_p_yes(
        within_deadline(
            timeout,
            lambda: client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=5,
            ),
        )
    )


class OpenAIJudge:
    """Asks an OpenAI-compatible chat endpoint each question, one request per (answer,
    question), retried as RETRY_AFTER_CAP_S above says, with an append-only cache that also
    records what each reply cost (so that --judge-max-usd holds for the whole run). `timeout`:
    seconds a request may take in all (within_deadline). Thread-safe: judge_answers calls it from a
    pool of --judge-concurrency threads."""

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
        # which judge answers: a cached answer is reused only for the same endpoint and model (key)
        self.endpoint = (base_url or "https://api.openai.com/v1").rstrip("/")
        self.timeout = timeout
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
        """The cache key of one judgement: the judge (endpoint, model) and the prompt (which holds
        the question and the template). Another judge's answer is not this one's: `--from feedback
        --judge-base-url ANOTHER` once reused all 864 of the old judge's. Keys of older versions
        (model and prompt only) match nothing now: those lines still count what was spent."""
        return hashlib.sha256(f"{self.endpoint}\n{self.model}\n{prompt}".encode()).hexdigest()

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
        """P(yes) from the endpoint; JudgeError naming the last failure once the retries are used
        up (RETRY_AFTER_CAP_S above says which failure gets how many)."""
        last, unusable, malformed = None, 0, 0
        for attempt in range(self.max_retries + 1):
            try:
                p_yes, usage, from_text = self.request(prompt)
            except UnusableReply as e:  # paid for, so recorded; asked again at once, a few times
                self.record(usage=e.usage, unusable=e.reply)
                last, unusable = e, unusable + 1
                if unusable > UNUSABLE_RETRIES:
                    break
                continue
            # not a chat completion (ValueError: a body that is not JSON): MALFORMED_TRIES in all
            except (MalformedReply, ValueError, self.openai.APIResponseValidationError) as e:
                last, malformed = e, malformed + 1
                if malformed >= MALFORMED_TRIES:
                    break
            except (
                self.openai.RateLimitError,
                self.openai.APITimeoutError,
                self.openai.APIConnectionError,
                self.openai.InternalServerError,
                ReplyTooSlow,
            ) as e:
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
        return ask_chat(self.client, self.model, prompt, self.timeout)

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
# The judge as the reward, no reward model in between [not in the paper] (rlaif.py --compare)


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


# -----------------------------------------------------------------------------
# The judge of a run: which one, and what stops it from working (checked before any stage runs)


def judge_base_url(base_url):
    return base_url or os.environ.get("OPENAI_BASE_URL", "")


# The probe's questions have known answers, one Yes and one No: a judge that cannot say Yes to the
# first cannot judge, and neither can one that says the same to both (a judge that always said "No"
# passed a Yes-only probe, and the run ended with a reward model trained on nothing). PROBE_MARK at
# their start keeps them apart from the judge's prompts (a test server counts them apart).
PROBE_MARK = "[connection check]"
PROBES = (("Is 2 + 2 equal to 4?", "Yes"), ("Is 2 + 2 equal to 5?", "No"))


def probe_prompt(question):
    return f"{PROBE_MARK} {question} Answer with a single word, Yes or No."


def probe_judge(base_url, model, timeout=30.0, log=log):
    """One request of one output token per PROBES question, before any stage: does the endpoint
    answer within `timeout` seconds in all, take the key, serve the model, and say Yes where the
    answer is Yes and No where it is No? A problem line naming the URL and the model, or None.
    Whether log-probabilities came back is logged (without them P(yes) is 0 or 1: reply_p_yes)."""
    import openai

    where = f"the judge endpoint {base_url or 'https://api.openai.com/v1'} (--judge-model {model})"
    client = openai.OpenAI(
        api_key=judge_api_key(base_url), base_url=base_url or None, timeout=timeout, max_retries=0
    )
    from_text = False
    for question, known in PROBES:
        prompt = probe_prompt(question)
        try:
            p_yes, _, text = ask_chat(client, model, prompt, timeout)
        except Exception as e:  # what it means, or raised again: probe_problem
            return probe_problem(e, where, prompt, log)
        said = "Yes" if p_yes > 0.5 else "No" if p_yes < 0.5 else "neither"
        if said != known:
            return (
                f"{where}: asked {prompt!r}, it said {said} (P(yes) {p_yes:.2f}) where the answer "
                f"is {known}: a judge that gets a known answer wrong cannot judge the answers"
            )
        from_text = from_text or text
    log(
        f"[rlaif] judge probe: {where} answers Yes and No right, "
        + (
            "WITHOUT log-probabilities: P(yes) will be 0 or 1 (counted in feedback/done.json)"
            if from_text
            else "with log-probabilities"
        )
    )
    return None


def probe_problem(e, where, prompt, log=log):
    """The problem line for a probe request that failed with `e`, or None for a rate limit (the
    judge's retries wait for it, unless the money is gone); an unexpected error is raised again."""
    import openai

    if isinstance(e, openai.RateLimitError):
        if "insufficient_quota" in str(e):
            return f"{where}: no quota left (429 insufficient_quota)"
        log(f"[rlaif] judge probe: {where} is rate-limited (429) now; the judge will wait as asked")
        return None
    if isinstance(e, openai.NotFoundError):
        return f"{where}: 404, the model is not served there, or the URL does not end in /v1 ({e})"
    if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return f"{where}: the key was refused ({e.status_code}); check OPENAI_API_KEY"
    if isinstance(e, openai.APIStatusError):
        return f"{where}: HTTP {e.status_code} to one request ({str(e)[:200]})"
    if isinstance(e, ReplyTooSlow):
        return f"{where}: {e} to {prompt!r} (a server that sends bytes but never finishes?)"
    if isinstance(e, openai.APIConnectionError):  # time-outs too
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return f"{where}: unreachable, {type(e).__name__}: {e}{cause}. Is the server running?"
    if isinstance(e, UnusableReply):
        return f"{where}: asked {prompt!r}, {e}: it cannot answer the judge's questions"
    # ValueError: not JSON
    if isinstance(e, (JudgeError, ValueError, openai.APIResponseValidationError)):
        return f"{where}: not an OpenAI chat completion ({e})"
    raise e


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
# The stage of a run (rlaif.py): 3. AI feedback on the samples


def run_judge(cfg, cache_file):
    """The judge a run's settings name, with its cache (cost and answers; a run's is
    run_dir/judge_cache.jsonl) and spending cap."""
    return make_judge(
        cfg.judge,
        cfg.judge_model,
        cfg.judge_base_url,
        cache_file,
        cfg.judge_max_usd,
        log=log,
        price=cfg.judge_price,
    )


def feedback_stage(cfg, run, splits, out_dir=None, **files):
    """Stage 3: the judge answers the questions about every sampled answer (run_dir/sample); its
    Feedback rows go to run_dir/feedback. Done only when every answer has a score: an answer the
    judge could not score stops the stage with a count and the command that resumes it. Resumable:
    answers already judged are in the partial file, and every answered question in the judge's
    cache; a rerun asks only for the rest. files: samples in place of the run's (python judge.py
    --samples FILE), with out_dir (its feedback, partial file and cache) in place of the run's."""
    out_dir = Path(out_dir or run / "feedback")
    cache = out_dir / "judge_cache.jsonl" if files else run / RUN_FILES["judge_cache"]
    judge = run_judge(cfg, cache)
    samples = read_rows(run_file(run, "samples", files), Sample)
    partial = out_dir / Path(RUN_FILES["feedback_partial"]).name
    announce_judge(cfg, judge, samples, partial, splits["train"])
    kept = f"What was judged is kept ({partial}, {cache})"
    concurrency = cfg.judge_concurrency if cfg.judge == "openai" else 1
    try:
        feedback = judge_answers(judge, samples, splits["train"], partial, concurrency, log=log)
    except JudgeBudgetExceeded as e:
        raise SystemExit(
            f"[feedback] stopped: {e}. {kept}; rerun with a higher --judge-max-usd to resume."
        ) from None
    except JudgeFailed as e:
        again = f"python rlaif.py --run-dir {run}" if not files else "the same command"
        raise SystemExit(
            f"[feedback] not done: {e}. {kept}; {again} resumes, asking only for what is missing."
        ) from None
    log_feedback(feedback)
    write_rows(out_dir / Path(RUN_FILES["feedback"]).name, feedback)
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


def main(argv=None):
    """python judge.py: the feedback stage alone, on an existing run (default runs/tiny), or on
    sampled answers given as a file (--samples) into --out."""
    cfg, run, given = stage_command_line(
        "feedback",
        "AI feedback: the judge answers yes/no questions about sampled answers. On a run of "
        "rlaif.py (--run-dir: its sample, into run_dir/feedback, with the run's recorded settings; "
        "--judge-* flags of rlaif.py change them; later stages are set aside) or on a file "
        "(--samples FILE, into --out, the judge of --settings). An interrupted feedback stage "
        "resumes.",
        argv,
        inputs=("samples",),
    )
    splits = prepare.run_splits(cfg)
    if given is not None:
        run_alone(run, lambda: feedback_stage(cfg, None, splits, out_dir=run, **given))
    else:
        run_stage(cfg, run, "feedback", feedback_stage, splits)


if __name__ == "__main__":
    main()
