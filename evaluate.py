"""
The paper's evaluation (Dutta et al. 2024, section 4): executability rate, Gorilla's AST accuracy and
hallucination rate, ROUGE-L and CodeBLEU, for any set of answers to the held-out questions.

    python evaluate.py --answers runs/tiny/eval/rlaif_answers.jsonl   # score a JSONL of answers
    python evaluate.py --model runs/tiny/ppo/model                    # generate with a checkpoint, then score
    python evaluate.py --gorilla                                      # score Gorilla-7B's published answers

Every metric is written out here (no metric packages at run time); tests/test_evaluate.py checks them
against rouge-score and codebleu.
"""
import argparse
import ast
import json
import keyword
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.gorilla import prepare

ROOT = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# Answer parsing (tolerant of the partial answers small models write)

def answer_api_call(text):
    """The api_call of an answer, cut as Gorilla's ast_eval_hf.py does: the text after
    '<<<api_call>>>:' up to the last ')' before '<<<api_provider>>>' (the whole text if no tag)."""
    if "api_call" not in text:
        return text.strip()
    part = text.split("api_call", 1)[1].split("api_provider")[0]
    start = part.index(":") + 1 if ":" in part else 0
    end = part.rindex(")") + 1 if ")" in part else len(part)
    return part[start:end].strip()


def answer_code(text):
    return prepare.parse_answer(text)["code"]


# -----------------------------------------------------------------------------
# Gorilla's AST match (Patil et al. 2023, section 4; eval-scripts/ast_eval_hf.py), on Python's ast

def literal(node):
    """A call argument as comparable text: the value of a literal (so 'x' == "x"), else its source."""
    try:
        return repr(ast.literal_eval(node))
    except Exception:
        return ast.unparse(node)


def calls_in(source):
    """[(function name, [argument values])] for every call in `source`; [] if it does not parse."""
    try:
        tree = ast.parse(source.strip())
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            args = [literal(a) for a in node.args] + [literal(k.value) for k in node.keywords]
            out.append((ast.unparse(node.func), args))
    return out


class APIDatabase:
    """The 925 HuggingFace APIs; match() finds the entry an answer's api_call refers to."""

    def __init__(self, apis=None):
        self.apis = apis if apis is not None else prepare.load_api_database()
        # reference call of each entry: its first (outermost) call's name and argument values
        self.refs = [(calls_in(a["api_call"]) or [(None, [])])[0] for a in self.apis]

    def match(self, api_call):
        """Index of the first entry whose function name appears among the answer's calls with every one
        of the entry's argument values among that call's arguments; None = hallucination."""
        candidates = calls_in(api_call)
        for i, (name, args) in enumerate(self.refs):
            if name is None:
                continue
            for cand_name, cand_args in candidates:
                if cand_name == name and all(a in cand_args for a in args):
                    return i
        return None


def ast_verdict(db, answer, reference_domain):
    """'correct' (a real API of the question's domain), 'wrong' (real API, other domain) or
    'hallucination' (no API database entry matches)."""
    i = db.match(answer_api_call(answer))
    if i is None:
        return "hallucination"
    return "correct" if db.apis[i]["domain"] == reference_domain else "wrong"


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
# CodeBLEU (Ren et al. 2020): 0.25 BLEU + 0.25 keyword-weighted BLEU + 0.25 AST match + 0.25 data flow

# Python's keywords and soft keywords: the tokens CodeBLEU's weighted n-gram match weighs 1 (others 0.2).
PY_KEYWORDS = set(keyword.kwlist) | {"match", "case", "type"}


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(prediction, reference, keyword_weighted=False, max_n=4, epsilon=0.1):
    """Sentence BLEU as CodeBLEU computes it: whitespace tokens, uniform weights, smoothing 'method1'
    (epsilon for zero counts), brevity penalty. keyword_weighted: the unigram term becomes a recall
    in which Python keywords weigh 1 and other tokens 0.2 (CodeBLEU's weighted n-gram match)."""
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
    # The codebleu package measures the reference as 2 tokens long in the weighted variant (it takes
    # len() of a [tokens, weights] pair), which in effect turns the brevity penalty off there; we match it.
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
    """Every inner node's shape (node types only, no names or values), like tree-sitter's s-expressions."""
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
    norm = lambda v: names.setdefault(v, f"var_{len(names)}")
    return [(norm(v), rel, tuple(norm(p) for p in parents)) for v, rel, parents in edges]


def dataflow_match(prediction, reference):
    ref = data_flow(parse_python(reference))
    pred = Counter(data_flow(parse_python(prediction)))
    if not ref:
        return None  # CodeBLEU then counts this component as 1 (its `dataflow_match_score or 1`)
    matched = 0
    for edge in ref:
        if pred[edge] > 0:
            pred[edge] -= 1
            matched += 1
    return matched / len(ref)


def codebleu(prediction, reference):
    """CodeBLEU with its default weights (0.25 each); also returns the four components."""
    parts = dict(ngram_match=bleu(prediction.strip(), reference.strip()),
                 weighted_ngram_match=bleu(prediction.strip(), reference.strip(), keyword_weighted=True),
                 syntax_match=syntax_match(prediction, reference),
                 dataflow_match=dataflow_match(prediction, reference))
    flow = parts["dataflow_match"]
    score = 0.25 * (parts["ngram_match"] + parts["weighted_ngram_match"] + parts["syntax_match"]
                    + (flow if flow else 1.0))
    return score, parts
