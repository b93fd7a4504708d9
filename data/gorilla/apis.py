"""
Gorilla's HuggingFace API database (925 APIs) and the parsing of an answer's api_call and code:
what the judge shows as documentation, what the AST metric matches against, and what the offline
executability check knows. Used by reward.py, evaluate.py and sandbox.py alike.
"""
import ast
import json
import re
from pathlib import Path

from data.gorilla import prepare

API_NAMES_FILE = Path(__file__).resolve().parent / "api_names.json"  # made by make_api_names.py
MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")                 # a Hub id: 'org/name'


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


# -----------------------------------------------------------------------------
# The database

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
        of the entry's argument values among that call's arguments; None = hallucination
        (Gorilla's AST match, Patil et al. 2023, section 4)."""
        candidates = calls_in(api_call)
        for i, (name, args) in enumerate(self.refs):
            if name is None:
                continue
            for cand_name, cand_args in candidates:
                if cand_name == name and all(a in cand_args for a in args):
                    return i
        return None

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
            m = re.match(r"\s*(\w+)\.from_pretrained\(\s*['\"](%s)['\"]" % MODEL_ID.pattern, str(a.get("api_call", "")))
            if m and not m.group(1).startswith("Auto"):
                out[m.group(2)] = m.group(1)
        return out


def library_names():
    """{module: public names} and the pipeline tasks of the pinned transformers (api_names.json)."""
    return json.loads(API_NAMES_FILE.read_text())
