"""AI feedback against a real OpenAI-compatible HTTP server on 127.0.0.1, the rules judge on
hand-written answers, and the reward model's ability to learn a ranking."""

import dataclasses
import json
import math
import multiprocessing
import os
import signal
import time

import pytest
import torch

from data.gorilla import prepare
from judge import QUESTIONS, Feedback, OpenAIJudge, RulesJudge, combine, judge_answers
from runs import Sample, save_checkpoint
from tests.openai_server import FakeOpenAI


@pytest.fixture(scope="module")
def records():
    return prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def judge(server, tmp_path, **kw):
    kw = dict(dict(timeout=1.0, backoff=0.01, max_retries=3), **kw)
    return OpenAIJudge(
        "gpt-3.5-turbo", server.url, cache_file=tmp_path / "cache.jsonl", api_key="k", **kw
    )


def test_logprobs_give_p_yes(server, tmp_path):
    server.p_yes = 0.8
    j = judge(server, tmp_path)
    assert j.ask("q1") == pytest.approx(0.8)
    assert server.requests[0]["logprobs"] is True and server.requests[0]["max_tokens"] == 1


def test_text_reply_without_logprobs(server, tmp_path):
    server.default = "text"
    server.p_yes = 0.2
    assert judge(server, tmp_path).ask("q") == 0.0


def test_429_then_success_retries(server, tmp_path):
    server.script = ["429", "429"]
    assert judge(server, tmp_path).ask("q") == pytest.approx(0.8)
    assert len(server.requests) == 3


def test_persistent_500_gives_up_and_leaves_the_answer_unjudged(server, tmp_path, records):
    from judge import JudgeFailed

    server.default = "500"
    j = judge(server, tmp_path, max_retries=2)
    samples = [Sample(0, 0, "policy", [], [], prepare.format_answer(records[0].sections))]
    with pytest.raises(JudgeFailed, match="1 of 1 have no score.*gave up after 3 attempts"):
        judge_answers(j, samples, records, tmp_path / "fb.jsonl", log=lambda *a: None)
    # 1 + 2 retries of the first question; the others are not asked
    assert len(server.requests) == 3
    assert not (tmp_path / "fb.jsonl").exists()  # nothing written for it: a rerun judges it again


def test_hung_request_times_out_then_succeeds(server, tmp_path):
    server.script = ["hang"]
    t0 = time.time()
    assert judge(server, tmp_path, timeout=0.5).ask("q") == pytest.approx(0.8)
    assert time.time() - t0 < 4


def test_malformed_json_and_non_answers_are_retried(server, tmp_path):
    server.script = ["malformed", "text_other"]
    assert judge(server, tmp_path).ask("q") == pytest.approx(0.8)
    assert len(server.requests) == 3


def test_cache_means_never_paying_twice(server, tmp_path):
    j = judge(server, tmp_path)
    j.ask("same prompt")
    judge(server, tmp_path).ask("same prompt")  # a new process would read the same cache file
    assert len(server.requests) == 1


def _judge_forever(url, cache, out, n):
    recs = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    j = OpenAIJudge("gpt-3.5-turbo", url, cache_file=cache, api_key="k", timeout=2, backoff=0.01)
    samples = [
        Sample(i, i, "policy", [], [], prepare.format_answer(recs[i].sections)) for i in range(n)
    ]
    judge_answers(j, samples, recs, out, concurrency=2, log=lambda *a: None)


def test_crash_mid_run_then_resume_has_every_judgement_once(tmp_path, records):
    server = FakeOpenAI(delay=0.02)
    try:
        n = 12
        cache = tmp_path / "cache.jsonl"
        out = tmp_path / "fb.jsonl"
        child = multiprocessing.get_context("fork").Process(
            target=_judge_forever, args=(server.url, cache, out, n)
        )
        child.start()
        deadline = time.time() + 60
        while (not out.exists() or len(out.read_text().splitlines()) < 4) and child.is_alive():
            assert time.time() < deadline, "the judging child made no progress in 60 s"
            time.sleep(0.02)
        assert child.is_alive(), "the judging child died before the simulated crash"
        os.kill(child.pid, signal.SIGKILL)  # a crash, mid-run
        child.join()
        paid_before = len(server.requests)
        assert paid_before < n * len(QUESTIONS)
        _judge_forever(server.url, cache, out, n)
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()]
        assert sorted(ids) == list(range(n))  # every judgement present exactly once
        keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == n * len(QUESTIONS)
        # at most the in-flight ones asked again
        assert len(server.requests) <= n * len(QUESTIONS) + 2
    finally:
        server.close()


def test_rules_judge_on_hand_written_answers(records):
    r = next(
        x
        for x in records
        if x.api_data.get("api_call")
        == "AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')"
    )
    right = (
        " <<<domain>>>: Natural Language Processing Sentence Similarity\n"
        "<<<api_call>>>: AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')\n"
        "<<<api_provider>>>: Hugging Face Transformers\n<<<code>>>: from transformers import "
        "AutoModel\n"
        "model = AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')"
    )
    hallucinated = right.replace(
        "princeton-nlp/unsup-simcse-roberta-base", "princeton-nlp/made-up-model"
    )
    wrong_domain = (
        " <<<domain>>>: Computer Vision Depth Estimation\n"
        "<<<api_call>>>: pipeline('depth-estimation', "
        "model='sayakpaul/glpn-nyu-finetuned-diode-221221-102136')\n"
        "<<<api_provider>>>: Hugging Face Transformers\n<<<code>>>: from transformers import "
        "pipeline\n"
        "p = pipeline('depth-estimation', model='sayakpaul/glpn-nyu-finetuned-diode-221221-102136')"
    )
    syntax_error = right.replace("model = AutoModel", "model = = AutoModel")
    j = RulesJudge()
    a = j.answers(r, right)
    assert a == dict(
        domain_right=1,
        api_exists=1,
        api_fits_task=1,
        arguments_right=1,
        code_valid=1,
        code_uses_api=1,
    )
    assert combine(a) == pytest.approx(1.0)
    a = j.answers(r, hallucinated)
    assert a["api_exists"] == 0 and a["api_fits_task"] == 0
    assert a["code_valid"] == 0  # parses, but names a model id the documentation does not have
    a = j.answers(r, wrong_domain)
    # a real, runnable API for another task: more than garbage, well below the right API
    assert a["domain_right"] == 0 and combine(a) == pytest.approx(0.5)
    assert (
        a["api_exists"] == 1
        and a["api_fits_task"] == 0
        and a["arguments_right"] == 0
        and a["code_uses_api"] == 1
    )
    a = j.answers(r, syntax_error)
    assert a["api_exists"] == 1 and a["code_valid"] == 0
    # Gorilla's lenient AST match accepts an invented model id beside a
    # documented task; the judge does not
    gamed = right.replace(
        "AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')",
        "pipeline('text-generation', model='laion/ner-base-base-base')",
        1,
    )
    assert j.db.match("pipeline('text-generation', model='laion/ner-base-base-base')") is not None
    assert j.answers(r, gamed)["api_exists"] == 0
    # parses, names a real model, but reads a name nothing binds: a NameError when run
    unbound = right + "\nprint(model(**inputs))"
    assert j.answers(r, unbound)["code_valid"] == 0
    assert j.answers(r, right + "\ninputs = {}\nprint(model(**inputs))")["code_valid"] == 1


def test_undefined_names_are_the_reads_nothing_binds():
    from data.gorilla.apis import undefined_names

    code = """import numpy as np
from PIL import Image
import torch.nn
def f(a, *b, k=1, **c):
    global g
    g = a
    return [x for x in b] + list(c) + [lambda y: y + k]
try:
    v = f(1)
except ValueError as err:
    print(err)
match v:
    case {"a": w, **rest}:
        print(w, rest)
    case [first, *others]:
        print(first, others)
    case other:
        print(other)
with open("f") as fh:
    text = fh.read()
print(np, Image, torch.nn, g, text, len(v))
"""
    assert undefined_names(code) == []
    assert undefined_names(code + "print(image_path, np, missing)\n") == ["image_path", "missing"]
    # a name the user is told to supply is a placeholder, not an error
    marked = "img = Image.open(image_path)  # replace with your image\nprint(img, pixels)\n"
    assert undefined_names(marked) == ["pixels"]
    assert undefined_names("print(x") == []  # a syntax error is reported as one, not as names


@pytest.mark.slow
def test_reward_model_learns_a_ranking(tmp_path):
    """Judge scores that depend on one token: the reward model must rank held-out pairs by them."""
    from model import GPT, GPTConfig, ScalarModel
    from reward import RMConfig, normalise, train_reward_model

    torch.manual_seed(0)
    rm = ScalarModel(GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)))
    g = torch.Generator().manual_seed(0)
    samples = {}
    feedback = []
    for k in range(400):
        response = torch.randint(10, 60, (8,), generator=g).tolist()
        good = k % 4 < 2
        if good:
            response[int(torch.randint(0, 8, (1,), generator=g))] = 7
        samples[k] = Sample(k, k // 4, "policy", [1, 2, 3], response + [63], "")
        feedback.append(Feedback(k, k // 4, "policy", "test", {}, float(good)))

    class Tok:
        eot = 63

    metrics = train_reward_model(
        rm,
        samples,
        feedback,
        Tok,
        RMConfig(epochs=6, lr=1e-3, batch_size=16, heldout_fraction=0.2),
        1,
        1.0,
        "cpu",
        tmp_path / "ckpt.pt",
        log=lambda *a: None,
    )
    assert metrics["heldout_pairwise_accuracy"] > 0.9, metrics
    normalise(rm, samples, list(samples), Tok, "cpu")
    from reward import rm_scores

    r = rm_scores(rm, samples, list(samples), Tok, "cpu")
    assert abs(r.mean().item()) < 1e-4 and abs(r.std().item() - 1) < 1e-3


def test_all_comparisons_loss_equals_mean_pairwise_loss_and_gradients():
    """One forward pass per distinct answer gives the same loss and
    gradients as two passes per pair."""
    import torch.nn.functional as F

    from model import GPT, GPTConfig, ScalarModel
    from reward import comparisons_loss, rm_batch

    torch.manual_seed(0)
    rm = ScalarModel(GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)))
    g = torch.Generator().manual_seed(1)
    samples = {
        i: Sample(
            i,
            0,
            "policy",
            [1, 2, 3 + i % 2],
            torch.randint(5, 60, (3 + i,), generator=g).tolist() + [63],
            "",
        )
        for i in range(6)
    }
    pairs = [(0, 1), (0, 2), (2, 1), (3, 4), (5, 4), (3, 5), (0, 4)]

    class Tok:
        eot = 63

    loss = comparisons_loss(rm, samples, pairs, Tok, "cpu")
    loss.backward()
    grads = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    per_pair = []
    for a, b in pairs:  # the plain definition: both answers of each pair scored on their own
        r = rm.score(*rm_batch(samples, [a, b], Tok, "cpu"))
        per_pair.append(-F.logsigmoid(r[0] - r[1]))
    reference = torch.stack(per_pair).mean()
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-5
    for got, want in zip(grads, (p.grad for p in rm.parameters()), strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_judge_accepts_the_reference_answers(records):
    """The rules judge must agree with the references it stands in for: the reference
    answer's API exists and its domain is right for at least 98% of the training
    split (their label noise aside)."""
    train = prepare.offline_splits(records)["train"]
    j = RulesJudge()
    answers = [j.answers(r, prepare.format_answer(r.sections, compact=True)) for r in train]
    for key in ("api_exists", "domain_right"):
        share = sum(a[key] for a in answers) / len(answers)
        assert share >= 0.98, (key, share)


def test_pairs_keep_every_policy_comparison_and_cap_contrast_ones():
    import random

    from reward import make_pairs

    fb = [Feedback(i, 0, "policy", "test", {}, s) for i, s in enumerate([0.1, 0.5, 0.9, 0.5])]
    fb += [
        Feedback(10 + i, 0, src, "test", {}, s)
        for i, (src, s) in enumerate([("reference", 1.0), ("mismatched", 0.0), ("no_code", 0.2)])
    ]
    pairs = make_pairs(fb, 2, random.Random(0))
    own = {p for p in pairs if p[0] < 10 and p[1] < 10}
    assert own == {
        (1, 0),
        (2, 0),
        (3, 0),
        (2, 1),
        (2, 3),
    }  # all five ordered policy pairs; the tie is dropped
    assert len(pairs) == len(own) + 2
    assert all(fb_by_id_score(fb, a) > fb_by_id_score(fb, b) for a, b in pairs)


def test_another_domains_answer_is_compared_only_with_the_prompts_reference():
    import random

    from reward import make_pairs

    # It outscores every policy answer and the no-code one (its code runs),
    # yet only loses to the reference.
    fb = [Feedback(i, 0, "policy", "test", {}, s) for i, s in enumerate([0.1, 0.3])]
    fb += [
        Feedback(10 + i, 0, src, "test", {}, s)
        for i, (src, s) in enumerate([("reference", 0.9), ("mismatched", 0.4), ("no_code", 0.05)])
    ]
    pairs = make_pairs(fb, 100, random.Random(0))
    assert [p for p in pairs if 11 in p] == [(10, 11)]
    assert {(10, 0), (10, 1), (10, 12), (0, 12), (1, 12), (1, 0)} <= set(pairs)


def fb_by_id_score(fb, i):
    return next(f.score for f in fb if f.id == i)


def test_judge_budget_stops_before_the_cap_and_a_rerun_resumes_from_the_cache(server, tmp_path):
    """Each request costs 100 + 1 tokens at gpt-3.5-turbo's price ($0.0000515); a cap of
    $0.0003 allows five. Past that the judge refuses before sending; a new judge with the same
    cache pays for nothing it has."""
    from judge import JudgeBudgetExceeded

    j = judge(server, tmp_path, max_usd=0.0003)
    answered = []
    with pytest.raises(JudgeBudgetExceeded):
        for i in range(20):
            answered.append(j.ask(f"question {i} " + "x" * 40))
    assert 1 <= len(answered) < 20 and len(server.requests) == len(answered)
    assert j.spent_usd() <= 0.0003
    again = judge(server, tmp_path, max_usd=1.0)
    for i in range(len(answered)):
        again.ask(f"question {i} " + "x" * 40)
    assert len(server.requests) == len(answered)  # all from the cache


def test_feedback_stops_before_any_request_when_the_estimate_passes_the_cap(
    server, tmp_path, records
):
    import rlaif
    from judge import feedback_stage
    from runs import write_rows

    run = tmp_path / "run"
    train = prepare.offline_splits(records)["train"]
    write_rows(
        run / "sample" / "samples.jsonl",
        [
            Sample(i, i, "policy", [1], [2], prepare.format_answer(train[i].sections))
            for i in range(5)
        ],
    )
    cfg = rlaif.make_config(judge="openai", judge_base_url=server.url, judge_max_usd=0.0001)
    os.environ.setdefault("OPENAI_API_KEY", "k")
    with pytest.raises(SystemExit, match="passes --judge-max-usd"):
        feedback_stage(cfg, run, dict(train=train))
    assert server.requests == []


def test_reward_model_metrics_after_a_crash_and_resume_have_each_step_once(tmp_path):
    """Killed at step 40, after its step-20 checkpoint: the resumed training's metrics.jsonl has
    steps 1..N once each, then one held-out row."""
    from model import GPT, GPTConfig, ScalarModel
    from reward import RMConfig, train_reward_model

    g = torch.Generator().manual_seed(0)
    samples = {
        k: Sample(
            k,
            k // 4,
            "policy",
            [1, 2, 3],
            torch.randint(10, 60, (6,), generator=g).tolist() + [63],
            "",
        )
        for k in range(400)
    }
    feedback = [Feedback(k, k // 4, "policy", "test", {}, float(k % 4)) for k in samples]

    class Tok:
        eot = 63

    cfg = RMConfig(epochs=1, lr=1e-3, batch_size=8, heldout_fraction=0.2)

    def make():
        return ScalarModel(
            GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
        )

    def crash_at_40(msg):
        if msg.startswith("[reward] step 40/"):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        train_reward_model(
            make(),
            samples,
            feedback,
            Tok,
            cfg,
            1,
            1.0,
            "cpu",
            tmp_path / "ckpt.pt",
            log=crash_at_40,
        )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))  # as checkpointed
    # another learning rate is refused before the checkpoint is loaded, the setting named
    other = dataclasses.replace(cfg, lr=3e-3)
    with pytest.raises(ValueError, match=r"lr: 0.001 in the checkpoint, 0.003 now"):
        train_reward_model(
            make(), samples, feedback, Tok, other, 1, 1.0, "cpu", tmp_path / "ckpt.pt"
        )
    said = []
    cfg = dataclasses.replace(cfg, eval_every=25)  # how often it measures may change
    metrics = train_reward_model(
        make(), samples, feedback, Tok, cfg, 1, 1.0, "cpu", tmp_path / "ckpt.pt", log=said.append
    )
    assert f"[reward] resumed from {tmp_path / 'ckpt.pt'} at step 20" in said
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows[:-1] if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 40
    # every eval_every steps, each once
    measured = [r["step"] for r in rows if "heldout/pairs" in r]
    assert (
        measured == sorted(set(measured))
        and measured[:2] == [0, cfg.eval_every]
        and measured[-1] == steps[-1]
    )
    assert rows[-1]["heldout_pairwise_accuracy"] == metrics["heldout_pairwise_accuracy"]
    assert {"loss", "accuracy", "lr"} <= set(rows[1])


def test_an_answer_the_judge_could_not_score_stops_d_rlaif_rather_than_scoring_it():
    """d-RLAIF, best-of-n and validation go through judge.judge_score: a judge that gave up raises,
    rather than its answer scoring the mean (no signal, and nothing said)."""
    from judge import QUESTIONS, JudgeError, judge_score

    class GaveUp:
        def answers(self, record, answer):
            return dict(
                {k: 1.0 for k, _, _ in QUESTIONS[1:]},
                **{QUESTIONS[0][0]: None, "error": "HTTP 503"},
            )

    class Fine:
        def answers(self, record, answer):
            return {k: 1.0 for k, _, _ in QUESTIONS}

    assert abs(judge_score(Fine(), None, "") - 1.0) < 1e-9
    with pytest.raises(JudgeError, match="HTTP 503"):
        judge_score(GaveUp(), None, "")


@pytest.mark.slow
def test_the_reward_model_ends_at_least_as_accurate_as_the_log_likelihood_it_starts_from(tmp_path):
    """A toy where the starting network's log-likelihood already ranks the pairs (it was trained on
    the better answers): the reward model trained from it ranks held-out pairs at least as well as
    that log-likelihood does, and the step kept is the one with the best validation accuracy."""
    import json

    from model import GPT, GPTConfig, ScalarModel, pad_pairs, response_logprobs
    from reward import RMConfig, pair_accuracy, policy_pairs, split_prompts, train_reward_model
    from training import make_optimizer

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    samples = {}
    feedback = []
    # 120 prompts x 4 answers; the better ones start with token 5, the worse with 6
    for k in range(480):
        good = k % 4 < 2
        response = [5 if good else 6] + torch.randint(10, 60, (6,), generator=g).tolist() + [63]
        samples[k] = Sample(k, k // 4, "policy", [1 + (k // 4) % 3, 2, 3], response, "")
        feedback.append(Feedback(k, k // 4, "policy", "test", {}, float(good) + 0.01 * (k % 2)))
    lm = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    opt = make_optimizer(lm, 3e-3)
    good_batch = pad_pairs(
        [(samples[k].query, samples[k].response) for k in samples if k % 4 < 1][:64], 63
    )
    for _ in range(30):  # "SFT" on a few of the better answers
        (-response_logprobs(lm, *good_batch).sum(1).mean()).backward()
        opt.step()
        opt.zero_grad()

    class Tok:
        eot = 63

    cfg = RMConfig(
        epochs=4, lr=1e-3, batch_size=16, heldout_fraction=0.2, val_fraction=0.2, eval_every=10
    )
    heldout, _, rng = split_prompts(feedback, cfg, 1)
    _, pairs = policy_pairs(feedback, heldout, rng)
    with torch.no_grad():
        lp = response_logprobs(
            lm, *pad_pairs([(s.query, s.response) for s in samples.values()], 63)
        )
    by_id = {f.id: f for f in feedback}
    likelihood = pair_accuracy(
        dict(zip(samples, lp.sum(1).tolist(), strict=True)), by_id, pairs, "lp"
    )["lp/accuracy"]
    assert likelihood > 0.6  # the starting network already ranks the pairs
    metrics = train_reward_model(
        ScalarModel(lm, 0),
        samples,
        feedback,
        Tok,
        cfg,
        1,
        1.0,
        "cpu",
        tmp_path / "ckpt.pt",
        log=lambda *a: None,
    )
    assert metrics["heldout_pairwise_accuracy"] >= likelihood, (metrics, likelihood)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if "val/accuracy" in r and r["step"] > 0]  # step 0's head is random
    assert metrics["kept_step"] == max(measured, key=lambda r: r["val/accuracy"])["step"]


def test_tool_report_says_what_the_database_and_the_parser_know():
    from reward import APIDatabase, tool_report

    db = APIDatabase()
    right = (
        " <<<domain>>>: Natural Language Processing Sentence Similarity\n"
        "<<<api_call>>>: AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')\n"
        "<<<api_provider>>>: Hugging Face Transformers\n<<<code>>>: from transformers import "
        "AutoModel\n"
        "model = AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')"
    )
    report = tool_report(right, db)
    assert "code parses yes" in report and "unknown model ids: api_call 0, code 0" in report
    entry = db.apis[
        db.match("AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')")
    ]
    assert f"API entry: {entry['domain']} | {entry['api_call']}" in report
    invented = tool_report(right.replace("unsup-simcse-roberta-base", "made-up-model"), db)
    assert "api_call 1, code 1" in invented and "API entry: none" in invented
    # a documented call shape (Gorilla's lenient match accepts it) with an invented model: no entry
    shape = "pipeline('text-generation', model='laion/ner-base-base-base')"
    assert db.match(shape) is not None
    call = "AutoModel.from_pretrained('princeton-nlp/unsup-simcse-roberta-base')"
    gamed = tool_report(right.replace(call, shape, 1), db)
    assert "api_call 1, code 0" in gamed and "API entry: none" in gamed
    assert "code parses no" in tool_report(
        right.replace("model = AutoModel", "model = = AutoModel"), db
    )
    assert "undefined names 0" in report
    assert "undefined names 2" in tool_report(right + "\nprint(model(**inputs), text)", db)


def test_ppo_scores_with_the_tool_report_the_reward_model_was_trained_reading(tmp_path):
    """load_reward_model's score_fn (PPO's rollouts) appends the same report as reading_reports (the
    reward stage and best-of-n), so a rollout is scored as its twin sample was during training."""
    from model import GPT, GPTConfig, ScalarModel, pad_pairs
    from reward import APIDatabase, load_reward_model, reading_reports, rm_scores

    tok = prepare.tokenizer(True)
    torch.manual_seed(0)
    rm = ScalarModel(
        GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32))
    )
    torch.nn.init.normal_(rm.head.weight)
    save_checkpoint(tmp_path / "rm.pt", **rm.checkpoint(tools=True))
    answers = [
        " <<<domain>>>: Multimodal\n<<<api_call>>>: pipeline('summarization')\n<<<code>>>: x = (",
        " <<<domain>>>: Audio\n<<<api_call>>>: AutoModel.from_pretrained('a/b')\n<<<code>>>: y = 1",
    ]
    samples = {
        i: Sample(
            i, i, "policy", tok.encode("### Instruction: do it"), tok.encode(a) + [tok.eot], a
        )
        for i, a in enumerate(answers)
    }
    rm, score_fn = load_reward_model(tmp_path / "rm.pt", tok, "cpu")
    batch = pad_pairs([(s.query, s.response) for s in samples.values()], tok.eot)
    trained_on = rm_scores(
        rm, reading_reports(samples, tok, APIDatabase()), list(samples), tok, "cpu"
    )
    assert torch.allclose(score_fn(*batch), trained_on, atol=1e-5)
    # the report changes the score
    assert not torch.allclose(rm.score(*batch), trained_on, atol=1e-3)


def test_bradley_terry_loss_with_llama2_margin_on_hand_computed_scores():
    """A stand-in reward model that scores each answer by its first token. Pairs (better, worse)
    with scores (3, 1) and (0, 2), margins 1.5 and 0.5 (Touvron et al. 2023, eq. 2):
    -log sigmoid(r_better - r_worse - m) = log(1 + exp(-(2 - 1.5))) and log(1 + exp(-(-2 - 0.5))).
    Flipping the difference, dropping the margin or adding it each changes the value."""
    from reward import comparisons_loss

    class FirstTokenRM:
        def score_and_aux(self, query, query_mask, response, response_mask):
            return response[:, 0].float(), None

    class Tok:
        eot = 63

    samples = {i: Sample(i, 0, "policy", [1], [s, 63], "") for i, s in enumerate((3, 1, 0, 2))}
    pairs = [(0, 1), (2, 3)]
    want = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(2.5))) / 2
    margins = {(0, 1): 1.5, (2, 3): 0.5}
    loss = comparisons_loss(FirstTokenRM(), samples, pairs, Tok, "cpu", margins=margins)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    plain = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))) / 2  # no margins
    assert comparisons_loss(FirstTokenRM(), samples, pairs, Tok, "cpu").item() == pytest.approx(
        plain, rel=1e-6
    )
