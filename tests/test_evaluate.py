"""evaluate.py's metrics against the reference packages, on real Gorilla text."""

import json
import math
import statistics

import pytest

from data.gorilla import prepare
from data.gorilla.apis import APIDatabase, answer_api_call
from evaluate import ast_verdict, codebleu, rouge_l


@pytest.fixture(scope="module")
def records():
    return prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)


@pytest.fixture(scope="module")
def gorilla(records):
    answers = prepare.load_gorilla_answers()
    by_line = {r.line: r for r in records}
    return [(answers[q], by_line[q]) for q in sorted(answers) if q in by_line]


def full_answer(r):
    return prepare.format_answer(r.sections)


def test_rouge_l_equals_rouge_score(gorilla):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for answer, r in gorilla[:150]:
        ref = full_answer(r)
        assert abs(rouge_l(answer, ref) - scorer.score(ref, answer)["rougeL"].fmeasure) < 1e-6


def test_codebleu_components_against_codebleu_package(gorilla):
    """BLEU and weighted BLEU equal the package's; syntax and data flow are ast-based
    stand-ins for its tree-sitter ones: their mean absolute difference on Gorilla-7B's code
    vs the references is bounded."""
    pkg = pytest.importorskip("codebleu")
    syntax_diff, flow_diff = [], []
    for answer, r in gorilla[:120]:
        pred = prepare.parse_answer(answer)["code"]
        ref = r.sections["code"]
        if not pred.strip():
            continue
        theirs = pkg.calc_codebleu([ref], [pred], lang="python")
        _, ours = codebleu(pred, ref)
        assert abs(ours["ngram_match"] - theirs["ngram_match_score"]) < 1e-9
        assert abs(ours["weighted_ngram_match"] - theirs["weighted_ngram_match_score"]) < 1e-9
        syntax_diff.append(abs(ours["syntax_match"] - theirs["syntax_match_score"]))
        flow_diff.append(abs((ours["dataflow_match"] or 0) - theirs["dataflow_match_score"]))
    print(
        f"\nmean |syntax diff| {statistics.mean(syntax_diff):.3f}, "
        f"mean |dataflow diff| {statistics.mean(flow_diff):.3f} over {len(syntax_diff)} samples"
    )
    assert statistics.mean(syntax_diff) < 0.15
    assert statistics.mean(flow_diff) < 0.2


def test_ast_accuracy_of_references_is_near_total(records):
    db = APIDatabase()
    verdicts = [
        ast_verdict(db, full_answer(r), r.api_data.get("domain") or r.sections["domain"])
        for r in records
    ]
    counts = {v: verdicts.count(v) for v in set(verdicts)}
    print(f"\nreference answers: {counts} of {len(records)}")
    assert counts["correct"] / len(records) > 0.9, counts
    # Every miss is the data's own: the answer's api_call differs from its record's api_data (typos
    # like 'AutoModelFrom.pretrained'), or that call is not in the API database, or an earlier entry
    # matches it too (joblib.load('model.joblib') is inside joblib.load(...'sklearn_model.joblib'))
    # and Gorilla's rule takes the first match's domain.
    db_calls = [a["api_call"] for a in db.apis]
    for r, v in zip(records, verdicts, strict=True):
        call = r.api_data.get("api_call")
        if v != "correct" and answer_api_call(full_answer(r)) == call and call in db_calls:
            assert v == "wrong" and (
                db_calls.count(call) > 1 or db.match(call) < db_calls.index(call)
            ), r.line


def test_hallucinated_and_malformed_answers_are_scored(records):
    db = APIDatabase()
    r = records[0]
    fake = full_answer(r).replace("princeton-nlp/unsup-simcse-roberta-base", "made-up/model-xyz")
    assert ast_verdict(db, fake, r.api_data["domain"]) == "hallucination"
    assert rouge_l("", full_answer(r)) == 0.0 and rouge_l(full_answer(r), full_answer(r)) == 1.0
    for junk in ["", "<<<api_call>>>:", "<<<api_call>>>: pipeline(('", "<<<code>>>: def ("]:
        assert ast_verdict(db, junk, r.api_data["domain"]) == "hallucination"
        assert 0.0 <= codebleu(prepare.parse_answer(junk)["code"], r.sections["code"])[0] <= 1.0


def test_api_call_cut_follows_gorilla():
    text = (
        " <<<domain>>>: X\n"
        "<<<api_call>>>: pipeline('ner', model='dslim/bert-base-NER') extra\n"
        "<<<api_provider>>>: HF"
    )
    assert answer_api_call(text) == "pipeline('ner', model='dslim/bert-base-NER')"


def run_evaluate(*argv):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run(
        [sys.executable, "evaluate.py", *argv],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_answers_file_in_gorillas_format_scores_as_gorilla():
    """Gorilla's own published file (escaped newlines) gives the same table row as --gorilla."""

    def row(out):
        return [
            line
            for line in out.stdout.splitlines()
            if line.startswith("| ") and "executability" not in line and "---" not in line
        ][0].split("|")[2:]

    published = run_evaluate("--answers", str(prepare.GORILLA_ANSWERS_FILE), "--exec-mode", "none")
    ours = run_evaluate("--gorilla", "--exec-mode", "none")
    assert published.returncode == 0 and ours.returncode == 0, published.stderr + ours.stderr
    assert "escaped format recognised" in published.stdout
    assert row(published) == row(ours)


@pytest.mark.slow  # python evaluate.py, a new process each
@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "none of its 0 question_ids"),
        (b'{"question_id": 999999, "text": "x"}\n', "none of its 1"),
        (b'{"question_id": 32, "text": null}\n', ":1: expected"),
        (b'{"question_id": 32, "text": "ok"}\n\xff\xfe\n', ":2: expected"),
    ],
)
def test_bad_answers_files_are_errors_naming_file_and_line(tmp_path, content, needle):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(content)
    out = run_evaluate("--answers", str(path), "--exec-mode", "none")
    assert out.returncode == 1, out.stderr
    assert needle in out.stderr and "answers.jsonl" in out.stderr, out.stderr


def test_seeds_table_gives_each_methods_mean_min_and_max_over_runs(tmp_path):
    from evaluate import seeds_table

    def finished(name, results):
        (tmp_path / name / "evaluate").mkdir(parents=True)
        done = tmp_path / name / "evaluate" / "done.json"
        done.write_text(json.dumps({"results": results}))
        return tmp_path / name

    def row(ex, ast, hal, judge=None):
        m = dict(executability=ex, ast_accuracy=ast, hallucination=hal)
        return m | ({"judge_score": judge} if judge is not None else {})

    picks = {
        "best-of-8 (judge's pick)": row(0.6, 0.3, 0.2),
        "best-of-8 (RM's pick)": row(0.5, 0.2, 0.3),
    }
    runs = [
        finished("s1", {"SFT (tiny, seed 1)": row(0.2, 0.1, 0.5, 0.2), "DPO": row(0.3, 0.2, 0.4)}),
        finished("s2", {"SFT (tiny, seed 2)": row(0.4, 0.3, 0.3, 0.4)} | picks),
    ]
    lines = seeds_table(runs).splitlines()
    assert (
        lines[2]
        == "| SFT | 2 | 30.0 [20.0, 40.0] | 20.0 [10.0, 30.0] | 40.0 [30.0, 50.0] | 0.300 |"
    )
    assert lines[3] == "| DPO | 1 | 30.0 | 20.0 | 40.0 | - |"
    # a parenthesis without numbers names a different method: two picks stay two rows
    assert lines[4:6] == [
        "| best-of-8 (judge's pick) | 1 | 60.0 | 30.0 | 20.0 | - |",
        "| best-of-8 (RM's pick) | 1 | 50.0 | 20.0 | 30.0 | - |",
    ]
    with pytest.raises(SystemExit, match="s3/evaluate/done.json"):
        seeds_table(runs + [tmp_path / "s3"])


def test_paired_bootstrap_interval_on_synthetic_differences():
    from evaluate import paired_bootstrap

    # one run, 400 questions, difference 1 on 60% of them: mean 0.6, standard error
    # sqrt(0.6 x 0.4 / 400) = 0.0245, so the 95% interval is close to 0.6 +- 1.96 x 0.0245
    mean, low, high = paired_bootstrap([[1.0] * 240 + [0.0] * 160], n_resamples=10_000, seed=0)
    se = math.sqrt(0.6 * 0.4 / 400)
    assert mean == pytest.approx(0.6)
    assert low == pytest.approx(0.6 - 1.96 * se, abs=0.006)
    assert high == pytest.approx(0.6 + 1.96 * se, abs=0.006)
    assert paired_bootstrap([[1.0] * 240 + [0.0] * 160]) == (mean, low, high)  # seeded
    # no difference on average (+1 on 50 questions, -1 on 50): the interval must hold 0
    _, low, high = paired_bootstrap([[1.0] * 50 + [-1.0] * 50] * 3)
    assert low < 0 < high
    # three seeds of a clear gain: it must not
    _, low, _ = paired_bootstrap([[1.0] * 30 + [0.0] * 70, [1.0] * 40 + [0.0] * 60, [1.0] * 25])
    assert low > 0
    # the seed level: two runs whose questions all differ by 0.1 and by 0.5. A bootstrap over
    # questions alone would give [0.3, 0.3]; drawing 2 runs of 2 gives 0.1, 0.3, 0.5 with
    # probabilities 1/4, 1/2, 1/4, whose 2.5% and 97.5% quantiles are 0.1 and 0.5
    mean, low, high = paired_bootstrap([[0.1] * 20, [0.5] * 30])
    assert (mean, low, high) == pytest.approx((0.3, 0.1, 0.5))


def test_differences_table_pairs_each_method_with_sft_question_by_question(tmp_path):
    from evaluate import VERDICTS, differences_table

    def run(name, verdicts):
        path = tmp_path / name / VERDICTS
        path.parent.mkdir(parents=True)
        rows = [
            dict(method=m, question_id=q, executable=e, ast_correct=a, hallucination=h)
            for m, answers in verdicts.items()
            for q, (e, a, h) in enumerate(answers)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    # RLAIF executes every question SFT executes and 2 more of 10; same AST and hallucination
    sft = [(q < 3, q < 2, q > 7) for q in range(10)]
    rlaif = [(q < 5, q < 2, q > 7) for q in range(10)]
    one = run("s1", {"SFT (tiny, 1.0M params)": sft, "RLAIF (tiny, 1.0M params)": rlaif})
    lines = differences_table([one], n_resamples=2000).splitlines()
    assert "over questions only (1 run" in lines[0]
    # +20 points; the per-question differences are 1 on 2 questions of 10, so resampled means
    # range over 0-60 points and the 95% interval is inside it, never below 0
    row = lines[4]
    assert row.startswith("| RLAIF | 1 | +20.0 [+0.0, +") and row.endswith(
        "| +0.0 [+0.0, +0.0] | +0.0 [+0.0, +0.0] |"
    ), row
    old = tmp_path / "s0"
    (old / "evaluate").mkdir(parents=True)  # evaluated before verdicts were kept
    two = run("s2", {"SFT (tiny, 1.0M params)": sft, "RLAIF (tiny, 1.0M params)": sft})
    table = differences_table([one, two, old], n_resamples=2000)
    assert "over seeds (2 runs)" in table and "| RLAIF | 2 | +10.0 [" in table
    assert f"No per-question verdicts ({VERDICTS}" in table and str(old) in table


def test_scoring_a_models_answers_takes_the_settings_of_its_run(tmp_path, records):
    """--settings RUN/config.json: the answer length, executability and validation split of the
    run that made the model; a flag given still wins. Without it, the offline default's."""
    import evaluate
    from config import Config, save_config

    save_config(Config(val_percent=20, max_answer_tokens=77, exec_mode="none"), tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(
        "".join(json.dumps(dict(question_id=r.line, text="x")) + "\n" for r in records)
    )

    def parsed(*argv):
        args = evaluate.command_line().parse_args(["--answers", str(answers), *argv])
        return evaluate.with_settings(args)

    run = parsed("--settings", str(tmp_path / "config.json"), "--split", "val", "--device", "cuda")
    assert (run.max_answer_tokens, run.exec_mode, run.device) == (77, "none", "cuda")
    default = parsed("--split", "val")
    assert (default.max_answer_tokens, default.exec_mode) == (
        Config().max_answer_tokens,
        Config().exec_mode,
    )
    scored = {
        name: len(evaluate.answers_to_score(a)[1])
        for name, a in (("run", run), ("default", default))
    }
    assert scored == dict(
        run=len(prepare.offline_splits(records, 20)["val"]),
        default=len(prepare.offline_splits(records)["val"]),
    )
    assert scored["run"] > scored["default"]
