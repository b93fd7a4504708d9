"""
The paper's evaluation (Dutta et al. 2024, section 4): executability rate, Gorilla's AST accuracy
and hallucination rate, ROUGE-L and CodeBLEU, for any set of answers to the held-out questions.

    python evaluate.py --answers runs/tiny/evaluate/rlaif_answers.jsonl  # score a JSONL of answers
    python evaluate.py --model runs/tiny/ppo/model         # generate with a model, then score
    python evaluate.py --gorilla                           # Gorilla-7B's published answers

Every metric is written out here (no metric packages at run time); tests/test_evaluate.py checks
them against rouge-score and codebleu.
"""

import argparse
import ast
import json
import keyword
import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from config import Config, load_config, stage_command_line
from data.gorilla import prepare
from data.gorilla.apis import APIDatabase, answer_api_call, answer_code, canonical_domain
from judge import RulesJudge, judge_score
from model import GPT, GPT2_VOCAB, FlopMeter, sample_answers
from runs import RUN_FILES, log, read_jsonl, run_stage, tensorboard_text, write_jsonl, write_metrics
from sandbox import Sandbox
from training import autocast, progress, progress_log

# -----------------------------------------------------------------------------
# Gorilla's AST match (Patil et al. 2023, section 4; eval-scripts/ast_eval_hf.py), on Python's ast


def ast_verdict(db, answer, reference_domain):
    """'correct' (a real API of the question's domain), 'wrong' (real API, other domain) or
    'hallucination' (no API database entry matches). Domains compared as canonical labels (the
    database spells some two ways: 'Audio Classification' and 'Audio Audio Classification')."""
    i = db.match(answer_api_call(answer))
    if i is None:
        return "hallucination"
    return (
        "correct"
        if canonical_domain(db.apis[i]["domain"]) == canonical_domain(reference_domain)
        else "wrong"
    )


# -----------------------------------------------------------------------------
# ROUGE-L (Lin 2004): F-measure of the longest common subsequence, rouge-score's tokenisation


def rouge_tokens(text):
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if t]


def lcs_length(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction, reference):
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(r, p)
    precision, recall = lcs / len(p), lcs / len(r)
    return 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)


# -----------------------------------------------------------------------------
# CodeBLEU (Ren et al. 2020): 0.25 BLEU + 0.25 keyword-weighted BLEU + 0.25 AST match
# + 0.25 data-flow match

# Python's keywords and soft keywords: the tokens CodeBLEU's weighted n-gram match weighs 1
# (others 0.2).
PY_KEYWORDS = set(keyword.kwlist) | {"match", "case", "type"}


def ngrams(tokens, n):
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(prediction, reference, keyword_weighted=False, max_n=4, epsilon=0.1):
    """Sentence BLEU as CodeBLEU computes it: whitespace tokens, uniform weights, smoothing
    'method1' (epsilon for zero counts), brevity penalty. keyword_weighted: the unigram term
    becomes a recall in which Python keywords weigh 1 and other tokens 0.2 (CodeBLEU's weighted
    n-gram match)."""
    hyp, ref = prediction.split(), reference.split()
    if not hyp:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        h, r = ngrams(hyp, n), ngrams(ref, n)
        if keyword_weighted:  # recall over reference n-grams, clipped by the hypothesis
            w = (lambda g: 1.0 if g[0] in PY_KEYWORDS else 0.2) if n == 1 else (lambda g: 1.0)
            num = sum(min(c, h[g]) * w(g) for g, c in r.items())
            den = max(1, sum(c * w(g) for g, c in r.items()))
        else:  # modified precision
            num = sum(min(c, r[g]) for g, c in h.items())
            den = max(1, sum(h.values()))
        if n == 1 and num == 0:
            return 0.0
        logs.append(math.log((num or epsilon) / den))
    # The codebleu package measures the reference as 2 tokens long in the weighted variant
    # (it takes len() of a [tokens, weights] pair), which in effect turns the brevity
    # penalty off there; we match it.
    ref_len = 2 if keyword_weighted else len(ref)
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(sum(logs) / max_n)


def parse_python(code):
    """ast of the longest prefix of whole lines that parses (tree-sitter, which CodeBLEU uses, also
    keeps the parsable part of broken code); None if no line does."""
    lines = code.strip().splitlines()
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("\n".join(lines[:end]))
        except (SyntaxError, ValueError):
            continue
    return None


def subtree_shapes(tree):
    """Every inner node's shape (node types only, no names or values), like tree-sitter's
    s-expressions."""

    def kids(node):
        return [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.expr_context)]

    def shape(node):
        return type(node).__name__ + "(" + " ".join(shape(c) for c in kids(node)) + ")"

    return [shape(n) for n in ast.walk(tree) if kids(n)] if tree else []


def syntax_match(prediction, reference):
    ref = subtree_shapes(parse_python(reference))
    pred = set(subtree_shapes(parse_python(prediction)))
    return sum(s in pred for s in ref) / len(ref) if ref else 0.0


def data_flow(tree):
    """Def-use edges (variable, relation, parent variables), variable names normalised by first
    appearance (var_0, var_1, ...) as CodeBLEU does, so renaming does not matter."""
    if tree is None:
        return []
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            sources = [n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        edges.append((n.id, "computedFrom", tuple(sources)))
        elif isinstance(node, ast.For):
            sources = [n.id for n in ast.walk(node.iter) if isinstance(n, ast.Name)]
            for n in ast.walk(node.target):
                if isinstance(n, ast.Name):
                    edges.append((n.id, "computedFrom", tuple(sources)))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            edges.append((node.id, "comesFrom", (node.id,)))
    names = {}

    def norm(v):
        return names.setdefault(v, f"var_{len(names)}")

    return [(norm(v), rel, tuple(norm(p) for p in parents)) for v, rel, parents in edges]


def dataflow_match(prediction, reference):
    ref = data_flow(parse_python(reference))
    pred = Counter(data_flow(parse_python(prediction)))
    if not ref:
        # CodeBLEU then counts this component as 1 (its `dataflow_match_score or 1`, which also
        # turns a match of 0.0 into 1; codebleu() below does the same, for parity)
        return None
    matched = 0
    for edge in ref:
        if pred[edge] > 0:
            pred[edge] -= 1
            matched += 1
    return matched / len(ref)


def codebleu(prediction, reference):
    """CodeBLEU with its default weights (0.25 each); also returns the four components."""
    parts = dict(
        ngram_match=bleu(prediction.strip(), reference.strip()),
        weighted_ngram_match=bleu(prediction.strip(), reference.strip(), keyword_weighted=True),
        syntax_match=syntax_match(prediction, reference),
        dataflow_match=dataflow_match(prediction, reference),
    )
    flow = parts["dataflow_match"]
    score = 0.25 * (
        parts["ngram_match"]
        + parts["weighted_ngram_match"]
        + parts["syntax_match"]
        + (flow if flow else 1.0)
    )
    return score, parts


# -----------------------------------------------------------------------------
# Generating and scoring a set of answers


def without_explanation(answer):
    """Domain, api_call, provider and code of an answer (text or sections): the text ROUGE-L
    compares, so models that write no explanation (the tiny preset) and ones that do are scored on
    the same parts."""
    sections = prepare.parse_answer(answer) if isinstance(answer, str) else answer
    return "\n".join(sections[k] for k in prepare.SECTIONS if k != "explanation")


def score_answers(answers, records, db, sandbox=None):
    """Metrics of answers[i] to records[i] (paper section 4). Returns (summary, per-answer rows)."""
    rows = []
    for text, r in zip(answers, records, strict=True):
        reference_code = r.sections["code"]
        cb, _ = codebleu(answer_code(text), reference_code)
        rows.append(
            dict(
                question_id=r.line,
                ast=ast_verdict(db, text, r.api_data.get("domain") or r.sections["domain"]),
                rouge_l=rouge_l(without_explanation(text), without_explanation(r.sections)),
                codebleu=cb,
            )
        )
    if sandbox is not None:
        t0 = time.time()
        total = len(answers)

        def show(n):
            if n % 50 == 0 or n == total:
                log(f"[evaluate] ran {n}/{total} snippets {progress(n, total, t0)}")

        for row, (verdict, detail) in zip(
            rows, sandbox.run_all([answer_code(t) for t in answers], db, show), strict=True
        ):
            row["exec"], row["exec_detail"] = verdict, detail
    n = len(rows)

    def mean(k):
        return sum(row[k] for row in rows) / max(1, n)

    summary = dict(
        n=n,
        ast_accuracy=sum(r["ast"] == "correct" for r in rows) / max(1, n),
        hallucination=sum(r["ast"] == "hallucination" for r in rows) / max(1, n),
        rouge_l=mean("rouge_l"),
        codebleu=mean("codebleu"),
    )
    if sandbox is not None:
        classes = Counter(r["exec"] for r in rows)
        summary.update(
            executability=classes["executable"] / max(1, n),
            executable=classes["executable"],
            on_placeholders=sum(
                r["exec"] == "executable" and r["exec_detail"].startswith("placeholder")
                for r in rows
            ),
            exec_failures={k: v for k, v in classes.items() if k != "executable"},
        )
    return summary, rows


def results_table(results):
    """Markdown table, one row per model, the paper's metrics in percent."""
    lines = [
        "| model | n | executability | AST accuracy | hallucination | ROUGE-L | CodeBLEU "
        "| judge score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in results.items():
        ex = (
            f"{100 * s['executability']:.1f} ({s['executable']}/{s['n']}; "
            f"{s.get('on_placeholders', 0)} on placeholder inputs)"
            if "executability" in s
            else "-"
        )
        lines.append(
            f"| {name} | {s['n']} | {ex} | {100 * s['ast_accuracy']:.1f} "
            f"| {100 * s['hallucination']:.1f} "
            f"| {100 * s['rouge_l']:.1f} | {100 * s['codebleu']:.1f} | "
            + (f"{s['judge_score']:.3f} |" if "judge_score" in s else "- |")
        )
    return "\n".join(lines)


def gorilla_answers_for(records):
    """Gorilla-7B's published answer to each record that has one (question_id = record line)."""
    published = prepare.load_gorilla_answers()
    kept = [r for r in records if r.line in published]
    return [published[r.line] for r in kept], kept


# -----------------------------------------------------------------------------
# The evaluation stage of a run: SFT vs RLAIF vs Gorilla-7B on the same held-out questions


def model_answers(model_dir, instructions, max_answer_tokens, device, seed=1):
    """Greedy answers of a saved model (its vocabulary tells which tokenizer it was trained
    with)."""
    model = GPT.from_pretrained(model_dir).to(device)
    meter = FlopMeter()
    tok = prepare.tokenizer(compact=model.config.vocab_size < GPT2_VOCAB)
    prompts = [prepare.prompt_ids(tok, s) for s in instructions]
    with autocast(device):
        responses = sample_answers(
            model,
            prompts,
            tok.eot,
            max_answer_tokens,
            temperature=0.0,
            seed=seed,
            on_batch=progress_log("generate", "answers", lambda: meter.line(model)),
        )
    n = sum(p.numel() for p in model.parameters())
    return [tok.decode(r) for r in responses], f"{n / 1e6:.1f}M params"


def make_sandbox(exec_mode, timeout=10.0, unsafe=False):
    return (
        None
        if exec_mode == "none"
        else Sandbox(offline=exec_mode == "offline", timeout=timeout, unsafe=unsafe)
    )


# The judge's pick is an oracle bound, not a method a user could run: the rules judge's
# api_fits_task is the AST check itself and api_exists the hallucination check, so its pick reads
# the test references. Gorilla-7B's row is its published answers scored by this code,
# not the metrics Gorilla published.
PICKERS = {"rm": "reward model's pick", "judge": "judge's pick; oracle: reads the references"}
GORILLA = "Gorilla-7B (its published answers, scored here)"
VERDICTS = "evaluate/verdicts.jsonl"  # one row per method and question


def verdict_row(method, row):
    """One question's verdicts for one method (a row of score_answers), for evaluate --plot's
    paired bootstrap; executable is None where executability was not measured."""
    return dict(
        method=method,
        question_id=row["question_id"],
        executable=row["exec"] == "executable" if "exec" in row else None,
        ast_correct=row["ast"] == "correct",
        hallucination=row["ast"] == "hallucination",
    )


def eval_questions(cfg, splits):
    """The records the evaluation stage (and --compare's best-of-n) answers: --eval-split's
    questions, the first --eval-limit of them. Settings are chosen on val; test is read for the
    final table only."""
    return splits[cfg.eval_split][: cfg.eval_limit or None]


def evaluate_stage(cfg, run, splits):
    test = eval_questions(cfg, splits)
    db = APIDatabase()
    sandbox = make_sandbox(cfg.exec_mode, cfg.exec_timeout, cfg.unsafe_exec)
    results, verdicts = {}, {}  # verdicts: each method's per-question rows, for the bootstrap
    # the judge's score of the test answers too, where judging is free: the offline rules judge
    judge = RulesJudge(db) if cfg.judge == "rules" else None
    models = (
        ("SFT", run / RUN_FILES["sft_model"]),
        ("RLAIF", run / RUN_FILES["ppo_model"]),
        ("d-RLAIF", run / RUN_FILES["drlaif"] / "model"),
        ("RLOO", run / RUN_FILES["rloo"] / "model"),
        ("GRPO", run / RUN_FILES["grpo"] / "model"),
        ("DPO", run / RUN_FILES["dpo"] / "model"),
        ("RS", run / RUN_FILES["rs"] / "model"),
    )
    for name, model_dir in models:
        if not model_dir.exists():  # d-RLAIF, RLOO, GRPO, DPO and RS exist with --compare only
            continue
        answers, size = model_answers(
            model_dir, [r.instruction for r in test], cfg.max_answer_tokens, cfg.device, cfg.seed
        )
        write_jsonl(
            run / "evaluate" / f"{name.lower()}_answers.jsonl",
            [dict(question_id=r.line, text=a) for r, a in zip(test, answers, strict=True)],
        )
        key = f"{name} ({cfg.init}, {size})"
        results[key], verdicts[key] = score_answers(answers, test, db, sandbox)
        if judge is not None:
            results[key]["judge_score"] = sum(
                judge_score(judge, r, a) for r, a in zip(test, answers, strict=True)
            ) / len(test)
        log(f"[evaluate] {name} scored")
    for pick in ("rm", "judge"):
        picked = run / RUN_FILES["best_of_n"].format(pick=pick)
        if picked.exists():
            given = read_answers(picked)
            name = f"SFT best-of-{cfg.best_of_n} ({PICKERS[pick]})"
            results[name], verdicts[name] = score_answers(
                [given[r.line] for r in test], test, db, sandbox
            )
    gorilla, kept = gorilla_answers_for(test)
    name = f"Gorilla-7B (its published answers to {len(kept)} of the same questions, scored here)"
    results[name], verdicts[name] = score_answers(gorilla, kept, db, sandbox)
    if sandbox is not None and not sandbox.isolated:
        results = {f"{k} [UNISOLATED EXEC]": v for k, v in results.items()}
        verdicts = {f"{k} [UNISOLATED EXEC]": v for k, v in verdicts.items()}
    write_jsonl(
        run / VERDICTS, [verdict_row(k, row) for k, rows in verdicts.items() for row in rows]
    )
    write_results(run, results, len(test), cfg.eval_split)
    return dict(results=results)


def write_results(run, results, n_questions, eval_split):
    """results.md (the table, under a line naming the questions answered), its TensorBoard copy and
    evaluate/metrics.jsonl (a row per method)."""
    split = f"{n_questions} {eval_split} questions" + (
        " (validation: for choosing settings, not the paper's table)" if eval_split == "val" else ""
    )
    (run / RUN_FILES["results"]).write_text(f"{split}\n\n{results_table(results)}\n")
    tensorboard_text("evaluate/results", results_table(results), 0)
    write_metrics(
        run / "evaluate" / "metrics.jsonl",
        [
            dict(method=k, **{m: v for m, v in s.items() if m != "exec_failures"})
            for k, s in results.items()
        ],
    )


# -----------------------------------------------------------------------------
# Pictures of a run: training curves and the results table (matplotlib, optional)

CURVES = (
    ("sft", "loss", "SFT loss"),
    ("reward", "accuracy", "reward model: pairwise accuracy (train batches, held-out prompts)"),
    ("ppo", "objective/scores", "PPO: rollouts' score (moving average), greedy validation"),
    ("ppo", "objective/kl", "PPO: KL to SFT (nats per answer)"),
    ("ppo", "completions/mean_length", "PPO: answer length (tokens)"),
    ("ppo", "completions/clipped_ratio", "PPO: share cut off before end-of-text"),
)
POLICY_RUNS = (
    ("ppo", "RLAIF (PPO)"),
    ("compare/drlaif", "d-RLAIF"),
    ("compare/rloo", "RLOO"),
    ("compare/grpo", "GRPO"),
)


def run_metrics(run):
    """{folder: its metrics.jsonl rows} of every stage the curves draw from (CURVES, POLICY_RUNS),
    each file read once; none for a stage that did not run."""
    folders = dict.fromkeys([stage for stage, _, _ in CURVES] + [f for f, _ in POLICY_RUNS])
    paths = {folder: run / folder / "metrics.jsonl" for folder in folders}
    return {folder: read_jsonl(path) if path.exists() else [] for folder, path in paths.items()}


def smooth(ys, k=10):
    return [
        sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
        for i in range(len(ys))
    ]


def plot_measured(ax, metrics, stage, key):
    """What a panel shows beside its per-batch curve: SFT's validation loss, the reward model's
    held-out accuracy (reward.train_reward_model measures it every few steps), the judge's mean
    score of the policies' greedy answers to the validation questions (right axis)."""
    if stage == "sft":
        val = [r for r in metrics["sft"] if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    if stage == "reward":
        held = [r for r in metrics["reward"] if "heldout/accuracy" in r]
        ax.plot(
            [r["step"] for r in held],
            [r["heldout/accuracy"] for r in held],
            "o-",
            label="held-out prompts, policy pairs",
        )
    if key == "objective/scores":
        twin = None
        for folder, label in POLICY_RUNS:
            val = [r for r in metrics[folder] if "eval/judge_score" in r]
            if val:
                twin = twin or ax.twinx()
                twin.plot(
                    [r["iteration"] for r in val],
                    [r["eval/judge_score"] for r in val],
                    "o--",
                    label=f"{label}: greedy validation, judge score (right)",
                )
        if twin is not None:
            twin.legend(fontsize=7, loc="lower right")


def plot_runs(run_dirs, out_dir=None):
    """curves.png (the first run's SFT loss, reward-model accuracy and PPO curves; d-RLAIF,
    RLOO and GRPO beside PPO when --compare ran) and results.png (each method's
    executability, AST accuracy and hallucination: the mean over the runs, a bar from min to
    max). Returns {file: number of panels}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install matplotlib") from None
    runs = [Path(r) for r in run_dirs]
    out = Path(out_dir) if out_dir else runs[0] / "evaluate"
    out.mkdir(parents=True, exist_ok=True)
    return {
        "curves.png": plot_curves(plt, runs[0], out / "curves.png"),
        "results.png": plot_results(plt, runs, out / "results.png"),
    }


def plot_curves(plt, run, out_file):
    """One panel per CURVES entry; the number of panels."""
    metrics = run_metrics(run)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=100)
    for ax, (stage, key, title) in zip(axes.flat, CURVES, strict=False):
        sources = POLICY_RUNS if stage == "ppo" else ((stage, stage),)
        for folder, label in sources:
            rows = [r for r in metrics[folder] if r.get(key) is not None]
            xs = [r.get("iteration", r.get("step")) for r in rows]
            ys = [r[key] for r in rows]
            if ys:  # noisy per-batch values are drawn as a moving average
                noisy = stage == "reward" or key == "objective/scores"
                suffix = " (batch)" if stage == "reward" else ""
                ax.plot(xs, smooth(ys) if noisy else ys, label=label + suffix)
        plot_measured(ax, metrics, stage, key)
        ax.set_title(title, fontsize=10)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            message = f"no {stage}/metrics.jsonl in this run"
            ax.text(0.5, 0.5, message, ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return len(CURVES)


def method_name(name):
    """A result's name without a final parenthesis that holds numbers (sizes and counts differ
    between runs; "(judge's pick...)" names a method and stays)."""
    return re.sub(r" \([^)]*\d[^)]*\)$", "", name)


def results_by_method(runs):
    """{method: its results, one per run that has it}, from each run's evaluate/done.json; a
    method's name without a parenthesis that holds numbers (sizes and counts differ between runs;
    "(judge's pick)" names a method and stays)."""
    by_method = {}
    for run in runs:
        done = Path(run) / "evaluate" / "done.json"
        if not done.exists():
            raise SystemExit(
                f"{done}: missing; finish the run first (python rlaif.py --run-dir {run})"
            )
        for name, m in json.loads(done.read_text())["results"].items():
            by_method.setdefault(method_name(name), []).append(m)
    return by_method


def seeds_table(runs):
    """Markdown: each method's executability / AST accuracy / hallucination over the runs as
    mean [min, max] in percent, and the judge's mean score; how many runs have the method."""
    lines = [
        "| method | runs | executability | AST accuracy | hallucination | judge score |",
        "|---|---|---|---|---|---|",
    ]
    for name, ms in results_by_method(runs).items():
        cells = []
        for key in ("executability", "ast_accuracy", "hallucination"):
            v = [100 * m[key] for m in ms if key in m]
            mean = f"{sum(v) / len(v):.1f}" if v else "-"
            cells.append(f"{mean} [{min(v):.1f}, {max(v):.1f}]" if len(v) > 1 else mean)
        judge = [m["judge_score"] for m in ms if "judge_score" in m]
        cells.append(f"{sum(judge) / len(judge):.3f}" if judge else "-")
        lines.append(f"| {name} | {len(ms)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Each method's difference from SFT with a 95% interval: a paired, two-level bootstrap (Efron and
# Tibshirani 1993, ch. 16; Davison and Hinkley 1997, section 3.8 for the two levels). Paired: the
# difference is taken question by question, so what is common to both models on a question
# (its difficulty) cancels. Two levels: seeds are resampled, then each chosen seed's questions, so
# the interval holds both the seed-to-seed and the question-to-question variation.

BOOTSTRAP_METRICS = (
    ("executability", "executable"),
    ("ast_accuracy", "ast_correct"),
    ("hallucination", "hallucination"),
)


def paired_bootstrap(diffs, n_resamples=10_000, seed=0, level=0.95):
    """diffs: one sequence per run (seed) of per-question differences, method minus SFT. Returns
    (mean over runs of each run's mean difference, low, high): the percentile interval of that
    statistic over n_resamples resamples of the runs with replacement and, within each drawn
    run, of its questions with replacement. One run: over its questions only."""
    runs = [np.asarray(d, dtype=float) for d in diffs]
    n = np.array([len(d) for d in runs])
    table = np.zeros((len(runs), n.max()))  # ragged runs, padded; padding is never read
    for i, d in enumerate(runs):
        table[i, : len(d)] = d
    rng = np.random.default_rng(seed)
    total = np.zeros(n_resamples)
    for _ in runs:  # one slot of the resampled set of runs at a time, all resamples at once
        pick = rng.integers(len(runs), size=n_resamples)
        size = n[pick][:, None]
        # size draws from the picked run's own questions (columns beyond its size are masked)
        k = np.minimum((rng.random((n_resamples, n.max())) * size).astype(int), size - 1)
        real = np.arange(n.max()) < size
        total += (table[pick[:, None], k] * real).sum(1) / n[pick]
    low, high = np.quantile(total / len(runs), [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean([d.mean() for d in runs])), float(low), float(high)


def run_verdicts(run):
    """{method: {question_id: verdict row}} of a run's evaluate/verdicts.jsonl; None for a run
    evaluated before the file existed."""
    path = Path(run) / VERDICTS
    if not path.exists():
        return None
    by_method = {}
    for row in read_jsonl(path):
        by_method.setdefault(method_name(row["method"]), {})[row["question_id"]] = row
    return by_method


def is_sft(name):
    """SFT's greedy row (its name without the sizes, or with an [UNISOLATED EXEC] mark)."""
    return name == "SFT" or name.startswith("SFT (")


def paired_differences(verdicts, method, key):
    """Per run, the method's per-question verdict minus SFT's (1/0 each) on the questions both
    answered; None where a run lacks the method or the metric."""
    diffs = []
    for v in verdicts:
        sft = next((rows for name, rows in v.items() if is_sft(name)), None)
        rows = v.get(method)
        if sft is None or rows is None:
            continue
        both = [q for q in rows if q in sft]
        if any(rows[q][key] is None or sft[q][key] is None for q in both) or not both:
            return None
        diffs.append([float(rows[q][key]) - float(sft[q][key]) for q in both])
    return diffs or None


def differences_table(runs, n_resamples=10_000, seed=0):
    """Markdown: each method's difference from SFT in percentage points with a 95% interval by
    paired_bootstrap, from the runs' evaluate/verdicts.jsonl; a note names the runs without
    one."""
    verdicts = {run: run_verdicts(run) for run in runs}
    missing = [str(r) for r, v in verdicts.items() if v is None]
    have = [v for v in verdicts.values() if v is not None]
    scope = (
        f"paired bootstrap over seeds ({len(have)} runs) and questions"
        if len(have) > 1
        else "paired bootstrap over questions only (1 run: seed-to-seed variation not included)"
    )
    lines = [
        f"Difference from SFT, percentage points, 95% interval ({scope}, {n_resamples} resamples):",
        "",
        "| method | runs | executability | AST accuracy | hallucination |",
        "|---|---|---|---|---|",
    ]
    methods = dict.fromkeys(m for v in have for m in v if not is_sft(m))
    for method in methods:
        cells, counted = [], 0
        for _, key in BOOTSTRAP_METRICS:
            diffs = paired_differences(have, method, key)
            if diffs is None:
                cells.append("-")
                continue
            counted = len(diffs)
            mean, low, high = (100 * x for x in paired_bootstrap(diffs, n_resamples, seed))
            cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]")
        lines.append(f"| {method} | {counted} | " + " | ".join(cells) + " |")
    if missing:
        lines.append(
            f"\nNo per-question verdicts ({VERDICTS}; evaluated before they were kept) in: "
            + ", ".join(missing)
        )
    return "\n".join(lines)


def plot_results(plt, runs, out_file):
    """Each method's executability, AST accuracy and hallucination over the runs: the mean, a bar
    from min to max. The number of panels."""
    by_method = results_by_method(runs)
    metrics = (
        ("executability", "executability"),
        ("ast_accuracy", "AST accuracy"),
        ("hallucination", "hallucination"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 5), dpi=100)
    for ax, (key, title) in zip(axes, metrics, strict=True):
        names = [n for n, ms in by_method.items() if all(key in m for m in ms)]
        vals = [[100 * m[key] for m in by_method[n]] for n in names]
        means = [sum(v) / len(v) for v in vals]
        below = [max(0.0, mu - min(v)) for mu, v in zip(means, vals, strict=True)]
        above = [max(0.0, max(v) - mu) for mu, v in zip(means, vals, strict=True)]
        ax.barh(names, means, xerr=[below, above], capsize=3)  # max(0, .): rounding, never < 0
        ax.invert_yaxis()
        ax.set_title(f"{title} (%, {len(runs)} run{'s' if len(runs) > 1 else ''})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_file)
    plt.close(fig)
    return len(metrics)


def read_answers(path):
    """{question_id: text} of a JSONL answers file; Gorilla's own escaped format ('\\n' for
    newlines) is recognised and undone, as prepare.load_gorilla_answers does for the published
    file."""
    given = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                obj = json.loads(line)
                qid, text = obj["question_id"], obj["text"]
                if not isinstance(qid, int) or not isinstance(text, str):
                    raise TypeError(
                        f"question_id must be an integer and text a string, not "
                        f"{type(qid).__name__} and {type(text).__name__}"
                    )
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise SystemExit(
                    f"{path}:{i}: expected a JSON object with question_id and text ({e})"
                ) from None
            given[qid] = text
    escaped = sum("\\n" in t and "\n" not in t for t in given.values())
    if escaped > len(given) / 2:  # Gorilla's response files escape newlines and quotes
        given = {q: prepare.unescape_gorilla(t) for q, t in given.items()}
        print(
            f"[evaluate] {path}: Gorilla's escaped format recognised "
            "(newlines and quotes unescaped)"
        )
    return given


def command_line():
    p = argparse.ArgumentParser(
        description="Score answers to the held-out Gorilla questions with the paper's "
        "metrics: executability, AST accuracy / hallucination, ROUGE-L, CodeBLEU. With no "
        "source flag: the evaluation stage of the run in --run-dir.",
    )
    p.add_argument(
        "--run-dir",
        default="runs/tiny",
        help="a run whose earlier stages are done (no source flag; default: runs/tiny)",
    )
    p.add_argument("--force", action="store_true", help="redo a finished evaluation of --run-dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--answers", help="JSONL with question_id and text (Gorilla's response format)"
    )
    src.add_argument(
        "--model", help="a model directory (config.json + model.safetensors) to generate with"
    )
    src.add_argument("--gorilla", action="store_true", help="Gorilla-7B's published answers")
    src.add_argument(
        "--plot",
        nargs="+",
        metavar="RUN_DIR",
        help="draw curves.png and results.png of run directories (results: the range over "
        "them) into the first one's evaluate/, and print each method's mean [min, max] over "
        "them and its difference from SFT with a 95%% interval (paired bootstrap over seeds "
        "and questions, from evaluate/verdicts.jsonl); needs matplotlib",
    )
    add_scoring_flags(p.add_argument_group("with --answers, --model or --gorilla"))
    return p


def add_scoring_flags(group):
    group.add_argument(
        "--settings",
        metavar="CONFIG_JSON",
        help="the run-level settings of this config.json (a run's: its split, answer length, "
        "executability, device) as the defaults of the flags below, e.g. runs/X/config.json "
        "with --model runs/X/ppo/model (default: the defaults of python rlaif.py)",
    )
    group.add_argument(
        "--split",
        choices=("test", "val", "all"),
        default="test",
        help="questions: the held-out split, the validation split (of --settings' "
        "val_percent) or all parsable eval records (default: test)",
    )
    group.add_argument(
        "--exec-mode",
        choices=("offline", "real", "none"),
        help="executability: checking stand-ins without network, real libraries, or skip "
        "(default: --settings')",
    )
    group.add_argument(
        "--exec-timeout",
        type=float,
        help="CPU seconds per snippet, the wall clock 3x (default: --settings')",
    )
    group.add_argument(
        "--max-answer-tokens", type=int, help="answer length cap for --model (default: --settings')"
    )
    group.add_argument("--device", help="device for --model (default: --settings')")
    group.add_argument("--out", help="write the summary and per-answer rows as JSON here")


def run_dir_stage(args, p):
    """No source flag: the evaluation stage of --run-dir, with the run's recorded settings."""
    given = [
        f"--{k.replace('_', '-')}"
        for k in (*RUN_SETTINGS, "settings", "split", "out")
        if getattr(args, k) != p.get_default(k)
    ]
    if given:
        p.error(
            f"{' '.join(given)} apply to --answers, --model or --gorilla; the evaluation stage "
            "of --run-dir uses the run's recorded settings"
        )
    cfg, run, _ = stage_command_line(
        "evaluate", p.description, ["--run-dir", args.run_dir] + ["--force"] * args.force
    )
    return run_stage(cfg, run, "evaluate", evaluate_stage, prepare.run_splits(cfg))


# the flags that default to --settings' values (a run's config.json), else to rlaif.py's defaults
RUN_SETTINGS = ("exec_mode", "exec_timeout", "max_answer_tokens", "device")


def with_settings(args):
    """args with each unset flag of RUN_SETTINGS taken from --settings (else the defaults), and
    its val_percent: a model is scored with the answer length, executability and validation split
    of the run that trained it, not the offline default's."""
    cfg = load_config(args.settings) if args.settings else Config()
    for key in RUN_SETTINGS:
        if getattr(args, key) is None:
            setattr(args, key, getattr(cfg, key))
    args.val_percent = cfg.val_percent
    return args


def answers_to_score(args):
    """(answers, records, name) from --answers, --gorilla or --model, on --split's questions."""
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True)
    if args.split != "all":
        records = prepare.offline_splits(records, args.val_percent)[args.split]
    if args.answers:
        given = read_answers(args.answers)
        records = [r for r in records if r.line in given]
        if not records:
            raise SystemExit(
                f"{args.answers}: none of its {len(given)} question_ids is a question of the "
                f"{args.split} split (question_id = line of data/gorilla/huggingface_eval.json)"
            )
        return [given[r.line] for r in records], records, Path(args.answers).stem
    if args.gorilla:
        answers, records = gorilla_answers_for(records)
        return answers, records, GORILLA
    answers, size = model_answers(
        args.model, [r.instruction for r in records], args.max_answer_tokens, args.device
    )
    return answers, records, f"{args.model} ({size})"


def main(argv=None):
    p = command_line()
    args = p.parse_args(argv)
    if not (args.answers or args.model or args.gorilla or args.plot):
        return run_dir_stage(args, p)
    if args.plot:
        print(seeds_table(args.plot))
        print()
        print(differences_table(args.plot))
        made = plot_runs(args.plot)
        out = Path(args.plot[0]) / "evaluate"
        print("\n".join(f"{out / f}: {n} panels" for f, n in made.items()))
        return
    answers, records, name = answers_to_score(with_settings(args))
    summary, rows = score_answers(
        answers, records, APIDatabase(), make_sandbox(args.exec_mode, args.exec_timeout)
    )
    print(results_table({name: summary}))
    if "exec_failures" in summary:
        print(f"executability failures by class: {summary['exec_failures']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))


if __name__ == "__main__":
    main()
