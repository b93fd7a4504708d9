"""
Gorilla's HuggingFace API database (936 entries, 895 distinct api_calls; the paper says 925 APIs)
and the parsing of an answer's api_call and code: what the judge shows as documentation, what the
AST metric matches against, and what the offline executability check knows. Used by reward.py,
evaluate.py and sandbox.py alike.
"""

import ast
import builtins
import io
import json
import re
import tokenize
from pathlib import Path

from data.gorilla import prepare

API_NAMES_FILE = Path(__file__).resolve().parent / "api_names.json"  # made by make_api_names.py
MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hub id: 'org/name'
# Keyword arguments that name a model; elsewhere an 'org/name' string is usually a path
# (savedir=...).
ID_KEYWORDS = (
    "model",
    "model_id",
    "model_name",
    "repo_id",
    "source",
    "pretrained_model_name_or_path",
    "model_name_or_path",
    "checkpoint",
    "repo",
    "model_path",
)


# -----------------------------------------------------------------------------
# Names a snippet reads and binds nowhere (the judge's code_valid, the reward model's tool report,
# the evaluation's placeholders share this one analysis)

PLACEHOLDER_COMMENT = re.compile(r"\b(replace|your|placeholder|substitute)\b", re.I)


def bound_names(tree):
    """Every name the module binds anywhere, scopes aside: assignments and other stores, imports,
    defs and classes, arguments, except and match captures, global/nonlocal, and the builtins."""
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return bound


def unbound_reads(tree):
    """The Name nodes that read a name bound nowhere in the module."""
    bound = bound_names(tree)
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in bound
    ]


def placeholder_names(code):
    """Names used but bound nowhere, on a line whose comment marks them as the
    user's to supply (`clip = load_clip()  # replace with your loading code`):
    stand-ins, as the user substitutes them."""
    return user_supplied(unbound_reads(ast.parse(code)), code)


def user_supplied(reads, code):
    """The names of `reads` (unbound_reads) on a line whose comment marks them as the user's."""
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    marked = {
        t.start[0]
        for t in tokens
        if t.type == tokenize.COMMENT and PLACEHOLDER_COMMENT.search(t.string)
    }
    return sorted({n.id for n in reads if n.lineno in marked})


def undefined_names(code):
    """The names `code` reads that nothing binds, less the placeholders the user supplies: the
    NameErrors a reader sees without running it (`image = Image.open(image_path)` with no
    image_path). [] for code that does not parse (that is a syntax error, reported as such)."""
    try:
        reads = unbound_reads(ast.parse(code))
        placeholders = set(user_supplied(reads, code)) if reads else set()
    except (SyntaxError, ValueError, tokenize.TokenError):
        return []
    return sorted({n.id for n in reads} - placeholders)


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


def argument_text(source, node):
    """A call argument as Gorilla's AST match compares it: its source text, outer quotes
    stripped."""
    text = ast.get_source_segment(source, node) or ast.unparse(node)
    return text.strip().strip("'\"")


def calls_in(source):
    """[(function name, [argument texts], the call's source text)] for every call in `source`; [] if
    it does not parse."""
    source = source.strip()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            args = [argument_text(source, a) for a in node.args] + [
                argument_text(source, k.value) for k in node.keywords
            ]
            out.append(
                (
                    ast.unparse(node.func),
                    args,
                    ast.get_source_segment(source, node) or ast.unparse(node),
                )
            )
    return out


def squash(text):
    return re.sub(r"\s+", " ", text).strip()


def unquote(text):
    return text.replace("'", "").replace('"', "")


# -----------------------------------------------------------------------------
# The database


class APIDatabase:
    """The 936 HuggingFace API entries; match() finds the entry an answer's api_call refers to."""

    def __init__(self, apis=None):
        self.apis = apis if apis is not None else prepare.load_api_database()
        # reference call of each entry: its first (outermost) call's name and argument texts;
        # entries that are not Python (command lines such as mlagents-load-from-hf) keep their text
        self.refs = []
        for a in self.apis:
            calls = calls_in(str(a["api_call"]))
            self.refs.append(calls[0][:2] if calls else (None, squash(str(a["api_call"]))))
        self.known_ids = set(self.model_ids())

    def match(self, api_call):
        """Index of the first entry whose call the answer's api_call makes; None = hallucination.
        Gorilla's AST match (Patil et al. 2023, section 4; eval-scripts/ast_eval_hf.py): the same
        function name, and each of the entry's arguments, quotes stripped, inside the text of that
        call. So the database's own spellings count (an unquoted model id, a nested call). An entry
        that does not parse as Python (a command line, an unquoted 'org/v1.4' id) matches when its
        text, quotes aside, is in the api_call. The judge, the reward model's data and evaluation
        all use this one matcher."""
        candidates = calls_in(api_call)
        return next(
            (i for i in range(len(self.apis)) if self.makes_call(api_call, i, candidates)), None
        )

    def makes_call(self, source, i, candidates=None):
        """Does `source` (an api_call or a code section) make entry i's call, by match()'s rule?"""
        name, args = self.refs[i]
        if name is None:
            return bool(args) and unquote(args) in unquote(squash(source))
        candidates = calls_in(source) if candidates is None else candidates
        return any(
            cand_name == name and all(a in cand_text for a in args)
            for cand_name, _, cand_text in candidates
        )

    def unknown_model_ids(self, source):
        """The Hub ids that `source`'s calls pass as a model (a positional argument or an
        ID_KEYWORDS keyword) and that no entry of the database names."""
        try:
            tree = ast.parse(source.strip())
        except (SyntaxError, ValueError):
            return []
        given = [
            a
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            for a in node.args + [k.value for k in node.keywords if k.arg in ID_KEYWORDS]
        ]
        return [
            a.value
            for a in given
            if isinstance(a, ast.Constant)
            and isinstance(a.value, str)
            and MODEL_ID.fullmatch(a.value)
            and a.value not in self.known_ids
        ]

    def model_ids(self):
        """Every 'org/name' string literal of the database's calls, names and examples."""
        ids = set()
        for a in self.apis:
            text = " ".join(str(a.get(k, "")) for k in ("api_call", "api_name", "example_code"))
            ids.update(re.findall(r"""['"](%s)['"]""" % MODEL_ID.pattern, text))
            ids.add(str(a.get("api_name", "")))
        return sorted(ids)

    def model_classes(self):
        """{model id: the class its api_call loads it with}, where that class is a concrete one
        (`Blip2ForConditionalGeneration.from_pretrained('...')`; not Auto classes or pipelines)."""
        out = {}
        for a in self.apis:
            m = re.match(
                r"\s*(\w+)\.from_pretrained\(\s*['\"](%s)['\"]" % MODEL_ID.pattern,
                str(a.get("api_call", "")),
            )
            if m and not m.group(1).startswith("Auto"):
                out[m.group(2)] = m.group(1)
        return out


def canonical_domain(label):
    """A domain label with its noise removed: lower case, repeated words once ('Tabular Tabular
    Classification' = 'Tabular Classification'), '-ing' forms as their stem ('Document Question
    Answering' = '... Answer'). The database spells 8 of its 40 domains in two ways."""
    words = [
        re.sub(r"ing$", "", w) for w in re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", str(label).lower())
    ]
    return " ".join(dict.fromkeys(words))


def library_names():
    """{module: public names} and the pipeline tasks of the pinned transformers (api_names.json)."""
    return json.loads(API_NAMES_FILE.read_text())
