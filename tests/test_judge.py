"""The judge fails loudly (docs/reliability.md, "The judge"): a run that ends with exit
status 0 had every answer judged. Each fault is played by a real OpenAI-compatible HTTP
server on 127.0.0.1 (tests/openai_server.py) against the judge, the feedback stage or the
whole command (rlaif.main on a run whose SFT and sampling are done), with small backoffs and
Retry-After values of a second or two."""

import functools
import hashlib
import json
import re
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import judge
import rlaif
from config import save_config
from data.gorilla import prepare
from runs import RUN_FILES, Sample, mark_done, write_rows
from tests.openai_server import PROBE_MARK, FakeOpenAI

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def train():
    return prepare.load_splits("", log=lambda *a: None)["train"]


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def quick_judge(monkeypatch):
    """The stage's judge retries 3 times from a 10 ms backoff (tests wait seconds, not minutes); a
    Retry-After is waited as the server asks. No key or URL from the environment."""
    monkeypatch.setattr(
        judge,
        "OpenAIJudge",
        functools.partial(judge.OpenAIJudge, backoff=0.01, max_retries=3, timeout=2.0),
    )
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def make_run(tmp_path, server, train, n=4, **settings):
    """A run (settings recorded) whose sft and sample stages are done: n answers, the references of
    the first n training instructions, to be judged by the OpenAI judge at `server`."""
    settings = dict(dict(judge_concurrency=1), **settings)
    cfg = rlaif.make_config(
        run_dir=str(tmp_path / "run"),
        judge="openai",
        judge_base_url=server.url,
        exec_mode="none",
        **settings,
    )
    run = Path(cfg.run_dir)
    (run / "sft").mkdir(parents=True)
    mark_done(run / "sft", {})
    answers = [prepare.format_answer(train[i].sections) for i in range(n)]
    write_rows(
        run / RUN_FILES["samples"],
        [Sample(i, i, "policy", [1], [2], a) for i, a in enumerate(answers)],
    )
    mark_done(run / "sample", {})
    save_config(cfg, run)
    return run


def rlaif_until_feedback(run, *flags):
    """python rlaif.py --run-dir RUN --until feedback, in this process: returns normally (exit
    status 0) or raises SystemExit (its message is what the user reads, exit status 1)."""
    rlaif.main(["--run-dir", str(run), "--until", "feedback", *flags])


def done_json(run):
    return json.loads((run / "feedback" / "done.json").read_text())


def cache_rows(run):
    return [json.loads(line) for line in (run / RUN_FILES["judge_cache"]).read_text().splitlines()]


def judge_alone(server, tmp_path, **kw):
    kw = dict(
        dict(
            timeout=2.0,
            backoff=0.01,
            max_retries=3,
            api_key="k",
            cache_file=tmp_path / "cache.jsonl",
        ),
        **kw,
    )
    return judge.OpenAIJudge.func("gpt-3.5-turbo", server.url, **kw)


def is_probe(body):
    return body["messages"][0]["content"].startswith(PROBE_MARK)


def recorded_sleeps(monkeypatch):
    """judge's time.sleep recorded instead of slept (time.time stays real)."""
    waits = []
    monkeypatch.setattr(judge, "time", SimpleNamespace(time=time.time, sleep=waits.append))
    return waits


# -----------------------------------------------------------------------------
# 1. Retry-After, outages, and a stage that is done only when every answer has a score


def test_retry_after_is_waited_as_asked_up_to_the_stated_cap(server, tmp_path, monkeypatch):
    waits = recorded_sleeps(monkeypatch)
    said = []
    server.script = ["429", "429"]
    server.retry_after = 1000
    j = judge_alone(server, tmp_path, log=said.append)
    assert j.ask("q") == pytest.approx(0.8)
    assert len(server.requests) == 3
    cap = 120.0  # judge.RETRY_AFTER_CAP_S, stated in the log
    # 1000 s asked: the cap
    assert len(waits) == 2 and all(cap <= w <= 1.1 * cap for w in waits), waits
    assert any("Retry-After" in m and "capped at 120 s" in m for m in said), said
    assert judge.RETRY_AFTER_CAP_S == cap
    server.script = ["429"]
    server.retry_after = 2
    waits.clear()
    j.ask("another q")
    assert len(waits) == 1 and 2 <= waits[0] <= 2.2  # what the server asks, not the 10 ms backoff


def test_the_default_retries_outlast_a_minute_long_outage(server, tmp_path, monkeypatch):
    """A dead endpoint (connections dropped) with the default backoff: the waits add up
    to more than 60 s, none longer than BACKOFF_CAP_S, before the judge gives up (then
    the stage stops: next tests)."""
    waits = recorded_sleeps(monkeypatch)
    server.default = "down"
    j = judge.OpenAIJudge.func("gpt-3.5-turbo", server.url, api_key="k", timeout=2.0, **QUIET)
    with pytest.raises(judge.JudgeError, match="gave up"):
        j.ask("q")
    assert len(server.requests) == len(waits) + 1
    assert sum(waits) > 60 and max(waits) <= judge.BACKOFF_CAP_S, waits


def test_rate_limited_with_retry_after_then_every_answer_is_judged(server, tmp_path, train):
    """429 with Retry-After: 1 for 2 s, 3 retries from a 10 ms backoff: waiting as asked, every
    answer is judged and the stage is done with all of them."""
    run = make_run(tmp_path, server, train, n=3)
    times = []  # of the judge's requests (the probe aside); 429 for 2 s from the first

    def limited(body):
        if not is_probe(body):
            times.append(time.time())
            return "429" if times[-1] - times[0] < 2.0 else None

    server.mode_for = limited
    server.retry_after = 1
    rlaif_until_feedback(run)
    assert done_json(run)["judged"] == 3
    feedback = [json.loads(line) for line in (run / RUN_FILES["feedback"]).read_text().splitlines()]
    assert len(feedback) == 3 and all(f["score"] is not None for f in feedback)
    assert server.replies["429"] >= 2 and times[-1] - times[0] >= 2.0
    assert len(cache_rows(run)) == 3 * len(judge.QUESTIONS)  # each question answered once


def test_answers_the_judge_gave_up_on_fail_the_stage_and_a_rerun_asks_only_for_them(
    server, tmp_path, train
):
    """Two answers judged, then the endpoint drops every connection: the stage fails naming the
    count and the command; nothing is marked done. That command, once the endpoint is back, asks
    only for the two missing answers' questions and finishes the stage."""
    run = make_run(tmp_path, server, train, n=4)
    server.script = ["logprobs"] * (2 * len(judge.QUESTIONS)) + ["down"] * 100
    resumes = rf"2 of 4 answers have no score.*python rlaif.py --run-dir {run} resumes"
    with pytest.raises(SystemExit, match=resumes):
        rlaif_until_feedback(run)
    assert not (run / "feedback" / "done.json").exists()
    assert len((run / RUN_FILES["feedback_partial"]).read_text().splitlines()) == 2
    # one question of each failed answer, 1 + 3 retries; no more
    assert server.replies["down"] == 2 * 4
    sent = len(server.requests)
    server.script = []
    rlaif_until_feedback(run)
    # the missing ones, nothing twice
    assert len(server.requests) - sent == 2 * len(judge.QUESTIONS)
    assert done_json(run)["judged"] == 4


# -----------------------------------------------------------------------------
# 2. A judge that never answers usably


def test_a_judge_that_never_says_yes_or_no_stops_at_the_first_batch_showing_its_reply(
    server, tmp_path, train
):
    run = make_run(tmp_path, server, train, n=20, judge_concurrency=2)
    server.mode_for = lambda body: None if is_probe(body) else "text_other"
    said = r"scored none of the \d answer\(s\).*replied 'Maybe', neither Yes nor No"
    with pytest.raises(SystemExit, match=said):
        rlaif_until_feedback(run)
    assert not (run / "feedback" / "done.json").exists()
    # per answer: its first question, asked again twice, then it stops
    tries = 1 + judge.UNUSABLE_RETRIES
    # 3 failures in a row, and the one in flight
    assert 3 * tries <= len(server.requests) <= 4 * tries
    unusable = [row for row in cache_rows(run) if "unusable" in row]
    # paid, counted
    assert len(unusable) == len(server.requests) and all(row["usd"] > 0 for row in unusable)


# -----------------------------------------------------------------------------
# 3. Replies without log-probabilities: counted and reported


def test_replies_without_logprobs_are_counted_per_answer_in_done_json(
    server, tmp_path, train, capsys
):
    """The first answer's six replies come without log-probabilities (P(yes) 0 or 1 from the text),
    the other two answers' with them: done.json says so, and the log warns."""
    run = make_run(tmp_path, server, train, n=3)
    server.script = ["text"] * len(judge.QUESTIONS)
    rlaif_until_feedback(run)
    done = done_json(run)
    assert done["judged"] == 3 and done["p_yes_from_text"] == {
        "answers": 1,
        "judgements": len(judge.QUESTIONS),
    }
    assert "WARNING" in capsys.readouterr().out
    assert sum(row["text"] for row in cache_rows(run)) == len(judge.QUESTIONS)


# -----------------------------------------------------------------------------
# 4. The endpoint and the model are probed before the first stage


def judge_config(server_url, **settings):
    return rlaif.make_config(
        judge="openai", judge_base_url=server_url, exec_mode="none", **settings
    )


def test_check_ready_probes_the_endpoint_with_two_cheap_requests(server, capsys):
    """One question whose answer is Yes, one whose answer is No (judge.PROBES)."""
    rlaif.check_ready(judge_config(server.url))
    assert len(server.probes) == 2 and server.requests == []
    assert all(p["max_tokens"] == 1 and p["model"] == "gpt-3.5-turbo" for p in server.probes)
    assert "with log-probabilities" in capsys.readouterr().out
    server.default = "text"
    rlaif.check_ready(judge_config(server.url))
    assert "WITHOUT log-probabilities" in capsys.readouterr().out


def test_an_unreachable_endpoint_is_refused_before_the_first_stage_naming_the_url(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = (
            f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed once the with ends: nobody listens
        )
    with pytest.raises(
        SystemExit, match=rf"cannot start:\n.*{url} \(--judge-model gpt-3.5-turbo\): unreachable"
    ):
        rlaif.check_ready(judge_config(url))


def test_a_model_the_endpoint_does_not_serve_is_refused_naming_it(server):
    server.models = {"gpt-3.5-turbo"}
    with pytest.raises(SystemExit, match=rf"{server.url} \(--judge-model llama3\): 404"):
        rlaif.check_ready(judge_config(server.url, judge_model="llama3"))


def test_a_model_that_cannot_say_yes_is_refused_before_the_first_stage(server, tmp_path, train):
    run = make_run(tmp_path, server, train)
    server.default = "text_other"
    with pytest.raises(SystemExit, match="replied 'Maybe', neither Yes nor No: it cannot answer"):
        rlaif_until_feedback(run)
    assert server.requests == [] and len(server.probes) == 1
    assert not (run / "feedback").exists()


# -----------------------------------------------------------------------------
# 5. The cost cap holds for the whole run, and needs a price


def test_the_cap_counts_what_earlier_runs_spent(server, tmp_path):
    """A cap of $0.0003 allows five requests of 101 tokens at gpt-3.5-turbo's price; a new judge on
    the same cache file (the next command) with the same cap sends nothing more."""
    j = judge_alone(server, tmp_path, max_usd=0.0003)
    with pytest.raises(judge.JudgeBudgetExceeded):
        for i in range(20):
            j.ask(f"question {i} " + "x" * 40)
    sent = len(server.requests)
    again = judge_alone(server, tmp_path, max_usd=0.0003)
    assert again.spent_usd() == pytest.approx(j.spent_usd())
    with pytest.raises(judge.JudgeBudgetExceeded, match="has spent"):
        again.ask("question 19 " + "x" * 40)
    assert len(server.requests) == sent


def test_rerunning_with_the_same_cap_spends_nothing_more(server, tmp_path, train):
    """Requests bill 5,000 prompt tokens (more than the estimate): the first command stops at the
    cap; the same command again sends nothing and says what the run has spent."""
    run = make_run(tmp_path, server, train, n=4, judge_max_usd=0.01)
    server.prompt_tokens = 5000
    with pytest.raises(SystemExit, match="rerun with a higher --judge-max-usd"):
        rlaif_until_feedback(run)
    sent = len(server.requests)
    assert 1 <= sent < 4 * len(judge.QUESTIONS)
    with pytest.raises(SystemExit) as stop:
        rlaif_until_feedback(run)
    assert len(server.requests) == sent, stop.value  # the same cap: nothing more is spent
    assert re.search(r"plus the \$0\.0\d+ spent so far\) passes --judge-max-usd", str(stop.value))
    assert sum(row["usd"] for row in cache_rows(run)) <= 0.01 + 1e-12


def test_a_cap_on_a_model_without_a_price_is_refused_before_any_request(server, tmp_path, train):
    run = make_run(tmp_path, server, train, judge_model="gpt-4o", judge_max_usd=0.001)
    with pytest.raises(
        SystemExit, match="no price is known for --judge-model gpt-4o.*--judge-price IN,OUT"
    ):
        rlaif_until_feedback(run)
    assert server.requests == [] and server.probes == []


def test_a_price_given_with_judge_price_keeps_the_cap(server, tmp_path, train):
    """gpt-4o at --judge-price 2.5,10: 3,000 + 1 tokens cost $0.00751; a cap
    of $0.02 allows two requests."""
    run = make_run(tmp_path, server, train, n=1, judge_model="gpt-4o", judge_max_usd=0.02)
    server.prompt_tokens = 3000
    with pytest.raises(SystemExit, match="rerun with a higher --judge-max-usd"):
        rlaif_until_feedback(run, "--judge-price", "2.5,10")
    rows = cache_rows(run)
    assert len(server.requests) == len(rows) == 2 and sum(r["usd"] for r in rows) == pytest.approx(
        2 * 0.00751
    )
    with pytest.raises(SystemExit, match="--judge-price 'abc': give USD per million"):
        rlaif_until_feedback(run, "--judge-price", "abc")


# -----------------------------------------------------------------------------
# 6. Log-probabilities that are no probability (issue 46)


def judge_cache(tmp_path):
    return [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["nan", "huge"])
def test_logprobs_that_are_no_probability_leave_the_reply_unscored(server, tmp_path, mode):
    """NaN log-probabilities became NaN scores; +1000 an OverflowError. Both are a reply without
    an answer: paid and recorded, asked again twice, then the judge gives up."""
    server.default = mode
    j = judge_alone(server, tmp_path, **QUIET)
    with pytest.raises(judge.JudgeError, match="log-probabilities that are no probability"):
        j.ask("q")
    assert len(server.requests) == 1 + judge.UNUSABLE_RETRIES
    rows = judge_cache(tmp_path)
    assert len(rows) == len(server.requests) and all(r["unusable"] == "Yes" for r in rows)
    assert not any("p_yes" in r for r in rows)


def test_tiny_logprobs_give_a_finite_p_yes(server, tmp_path):
    """Yes and No both at -1e4 (ZeroDivisionError: exp underflows to 0) is 0.5; the candidates
    of one word are summed."""
    server.default = "tiny"
    assert judge_alone(server, tmp_path).ask("q") == 0.5
    assert judge_cache(tmp_path)[0]["p_yes"] == 0.5
    top = [("Yes", -1e4), (" yes", -1e4), ("No.", -1e4), ("Not", 0.0)]
    assert judge.p_yes_of_logprobs(top) == pytest.approx(2 / 3)


def test_nan_logprobs_mid_run_leave_the_stage_not_done(server, tmp_path, train):
    """The issue's run: feedback done with NaN scores, the reward model trained on 0 pairs, exit
    status 0. Now nothing is scored, nothing is done, and the message says why."""
    run = make_run(tmp_path, server, train, n=3)
    server.mode_for = lambda body: None if is_probe(body) else "nan"
    with pytest.raises(SystemExit, match="scored none of the 3 answer.*no probability"):
        rlaif_until_feedback(run)
    assert not (run / "feedback" / "done.json").exists()
    assert not (run / RUN_FILES["feedback_partial"]).exists()
    assert len(server.requests) == 3 * (1 + judge.UNUSABLE_RETRIES)
    assert not any("p_yes" in r for r in cache_rows(run))


# -----------------------------------------------------------------------------
# 7. A text answer is exactly Yes or No


@pytest.mark.parametrize(
    "text, p_yes",
    [("Not", None), ("Nope", None), ("Yesterday", None), ("Yes.", 1.0), ("no!", 0.0), ("YES", 1.0)],
)
def test_a_text_answer_is_exactly_yes_or_no(server, tmp_path, text, p_yes):
    """ "Not" was read as No (864 judgements at P(yes) 0). Case and punctuation are trimmed."""
    server.default, server.other_text = "text_other", text
    j = judge_alone(server, tmp_path, **QUIET)
    if p_yes is None:
        with pytest.raises(judge.JudgeError, match=f"replied {text!r}, neither Yes nor No"):
            j.ask("q")
        assert len(server.requests) == 1 + judge.UNUSABLE_RETRIES
        assert [r["unusable"] for r in judge_cache(tmp_path)] == [text] * len(server.requests)
    else:
        assert j.ask("q") == p_yes and len(server.requests) == 1
        assert judge_cache(tmp_path)[0]["text"] is True


# -----------------------------------------------------------------------------
# 8. The probe has a known Yes and a known No; one score for every answer stops the run


@pytest.mark.parametrize(
    "mode, said, probes",
    [
        ("nan", "log-probabilities that are no probability", 1),
        ("huge", "log-probabilities that are no probability", 1),
        ("not", "replied 'Not', neither Yes nor No: it cannot answer", 1),
        ("always_no", r"equal to 4\?.*it said No \(P\(yes\) 0\.05\) where the answer is Yes", 1),
        ("always_yes", r"equal to 5\?.*it said Yes \(P\(yes\) 0\.95\) where the answer is No", 2),
    ],
)
def test_the_probe_refuses_a_judge_that_gets_a_known_answer_wrong(server, mode, said, probes):
    server.default = "text_other" if mode == "not" else mode
    server.other_text = "Not"
    with pytest.raises(SystemExit, match=said):
        rlaif.check_ready(judge_config(server.url))
    assert len(server.probes) == probes and server.requests == []


def test_feedback_with_one_score_for_every_answer_stops_before_the_reward_model(
    server, tmp_path, train
):
    """A judge that says No to every question (after a good probe): the feedback is what it said
    (done), and the reward stage refuses it, saying so, before any model is loaded."""
    run = make_run(tmp_path, server, train, n=3)
    server.mode_for = lambda body: None if is_probe(body) else "always_no"
    rlaif_until_feedback(run)
    assert done_json(run)["judged"] == 3 and len(server.requests) == 3 * len(judge.QUESTIONS)
    said = (
        r"gave all 3 answers the same score 0\.050 \(mean P\(yes\) per question: "
        r"domain_right 0\.05, .*--from feedback"
    )
    with pytest.raises(SystemExit, match=said):
        rlaif.main(["--run-dir", str(run), "--until", "reward"])
    assert not (run / "reward" / "done.json").exists()
    assert not (run / RUN_FILES["reward_model"]).exists()
    assert len(server.requests) == 3 * len(judge.QUESTIONS)  # nothing asked again


# -----------------------------------------------------------------------------
# 9. A total deadline per request


def test_a_slowloris_reply_is_cut_at_the_total_deadline(server, tmp_path):
    """One byte every 0.2 s never trips a 1 s per-read timeout (it held a run for 400 s); the
    request's wall-clock deadline of 1 s does, for the judge and for the probe."""
    server.default, server.drip, server.slowloris_for = "slowloris", 0.2, 6.0
    j = judge_alone(server, tmp_path, timeout=1.0, max_retries=1, **QUIET)
    t0 = time.time()
    with pytest.raises(
        judge.JudgeError, match="2 attempts: ReplyTooSlow: no complete reply within 1 s"
    ):
        j.ask("q")
    assert time.time() - t0 < 4 and len(server.requests) == 2
    assert not (tmp_path / "cache.jsonl").exists()  # nothing answered, nothing stored
    t0 = time.time()
    problem = judge.probe_judge(server.url, "gpt-3.5-turbo", timeout=1.0, **QUIET)
    assert "no complete reply within 1 s" in problem and time.time() - t0 < 3
    assert len(server.probes) == 1


# -----------------------------------------------------------------------------
# 10. The cache is the judge's: endpoint and model


def test_another_judge_does_not_reuse_the_cached_answers(server, tmp_path, train):
    """--from feedback with another --judge-base-url sent only the probe and reused the old judge's
    answers under the new judge's name. Now the new judge answers every question; the cache keeps
    both (append-only) and the first judge's answers still serve the first judge."""
    run = make_run(tmp_path, server, train, n=2)
    rlaif_until_feedback(run)
    first = len(server.requests)
    other = FakeOpenAI(p_yes=0.3)
    try:
        rlaif_until_feedback(run, "--from", "feedback", "--judge-base-url", other.url)
        assert len(other.requests) == 2 * len(judge.QUESTIONS) and len(server.requests) == first
        assert done_json(run)["judge"] == f"LLM judge gpt-3.5-turbo at {other.url}"
        feedback = [json.loads(x) for x in (run / RUN_FILES["feedback"]).read_text().splitlines()]
        assert all(p == pytest.approx(0.3) for f in feedback for p in f["answers"].values())
        assert len(cache_rows(run)) == 4 * len(judge.QUESTIONS)
        rlaif_until_feedback(run, "--from", "feedback", "--judge-base-url", server.url)
        assert len(server.requests) == first and len(other.requests) == 2 * len(judge.QUESTIONS)
    finally:
        other.close()


def test_an_old_cache_line_is_read_for_its_cost_and_not_reused(server, tmp_path):
    """A line of the old format (key: model and prompt, no endpoint) could be any endpoint's: its
    USD still counts towards the cap, its answer is asked again."""
    old_key = hashlib.sha256(b"gpt-3.5-turbo\nq").hexdigest()
    old = dict(key=old_key, p_yes=0.99, text=False, tokens=[100, 1], usd=0.001)
    (tmp_path / "cache.jsonl").write_text(json.dumps(old) + "\n")
    j = judge_alone(server, tmp_path)
    assert j.spent_usd() == pytest.approx(0.001)
    assert j.ask("q") == pytest.approx(0.8) and len(server.requests) == 1
    assert judge_cache(tmp_path)[0] == old  # append-only


# -----------------------------------------------------------------------------
# 11. A price is two finite numbers


@pytest.mark.parametrize("price", ["nan,nan", "inf,inf", "1,nan"])
def test_a_price_that_is_not_finite_is_refused_before_any_request(server, tmp_path, train, price):
    """--judge-price nan,nan sent all 864 requests past --judge-max-usd 0.001 (spend NaN)."""
    run = make_run(tmp_path, server, train, judge_model="gpt-4o", judge_max_usd=0.001)
    with pytest.raises(SystemExit, match=rf"--judge-price '{price}': .*two finite numbers >= 0"):
        rlaif_until_feedback(run, "--judge-price", price)
    assert server.requests == [] and server.probes == []
    assert not (run / "feedback").exists()


# -----------------------------------------------------------------------------
# 12. A malformed reply that repeats stops early


def test_a_repeated_empty_choices_reply_stops_after_two_tries(server, tmp_path, train):
    """200 with `choices: []` after the first answer: each answer gets MALFORMED_TRIES tries (the
    transport's retries and backoff took 387 s), and the stage stops after three in a row."""
    run = make_run(tmp_path, server, train, n=6)
    server.script = ["logprobs"] * len(judge.QUESTIONS) + ["empty_choices"] * 100
    said = (
        r"5 of 6 answers have no score: the judge gave up on 3 \(the last: gave up after 2 "
        r"attempts: MalformedReply: malformed reply, not a chat completion with a choice"
    )
    t0 = time.time()
    with pytest.raises(SystemExit, match=said):
        rlaif_until_feedback(run)
    assert server.replies["empty_choices"] == 3 * judge.MALFORMED_TRIES == 6
    assert time.time() - t0 < 10
    assert len((run / RUN_FILES["feedback_partial"]).read_text().splitlines()) == 1
    assert len(cache_rows(run)) == len(judge.QUESTIONS)  # a malformed reply stores nothing
