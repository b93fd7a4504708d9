"""
Gorilla APIBench, HuggingFace split (Patil et al. 2023): records, the one prompt/answer format,
the splits, and the API database file. Run it (from the repository root) to see the splits and to
rebuild vocab.json:

    python -m data.gorilla.prepare

A record's `code` field is "###Instruction: ... ###Output: <<<domain>>>: ... <<<api_call>>>: ...
<<<api_provider>>>: ... <<<explanation>>>: ... <<<code>>>: ...". We keep the instruction, the
sections, and the record's `api_data` (the API database entry it was written from).
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_FILE = HERE / "huggingface_eval.json"
API_FILE = HERE / "huggingface_api.jsonl"
GORILLA_ANSWERS_FILE = HERE / "response_huggingface_Gorilla_FT_0_shot.jsonl"
VOCAB_FILE = HERE / "vocab.json"

SECTIONS = ("domain", "api_call", "api_provider", "explanation", "code")
REQUIRED = (
    "domain",
    "api_call",
    "api_provider",
    "code",
)  # explanation is dropped by the compact format
SECTION_RE = re.compile(r"<<<(domain|api_call|api_provider|explanation|code)>>>:?")


class DataError(ValueError):
    pass


@dataclass
class Record:
    line: int  # 1-based line in the source file; = Gorilla's question_id for the eval file
    instruction: str
    sections: dict  # domain, api_call, api_provider, explanation, code (see SECTIONS)
    api_data: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# The one prompt and answer format


def format_prompt(instruction):
    return f"###Instruction: {instruction.strip()}\n###Output:"


def format_answer(sections, compact=False):
    """The answer the model learns to write. [offline stand-in] compact=True is the tiny preset's
    target, which a from-scratch CPU model can learn in minutes: no explanation, and the code cut
    after the line that makes the api_call (imports + the call: the part that decides executability
    and the AST metric)."""
    if not compact:
        return " " + "\n".join(f"<<<{n}>>>: {sections.get(n, '').strip()}" for n in SECTIONS)
    body = dict(sections, code=compact_code(sections.get("code", ""), sections.get("api_call", "")))
    return " " + "\n".join(
        f"<<<{n}>>>: {body.get(n, '').strip()}" for n in SECTIONS if n != "explanation"
    )


def compact_code(code, api_call):
    """The code's lines up to the first one that uses the api_call's first argument (else its
    function name), or the first 6 lines when neither appears."""
    lines = code.strip().splitlines()
    m = re.search(r"\((['\"]?[^,)'\"]*)", api_call)
    keys = [
        k
        for k in (m.group(1).strip("'\"") if m else "", api_call.split("(")[0].split(".")[-1])
        if k
    ]
    for key in keys:
        for i, line in enumerate(lines):
            if key in line and not line.lstrip().startswith(("import ", "from ", "#")):
                return "\n".join(lines[: i + 1])
    return "\n".join(lines[:6])


def tokenizer(compact):
    """A run's tokenizer: GPT-2's BPE, remapped onto the compact vocabulary of VOCAB_FILE when
    `compact` ([offline stand-in] for models trained from scratch). Imported here, not at the top,
    so that the sandbox's children, which read this package's API tables, never import torch."""
    from model import Tokenizer

    return Tokenizer(VOCAB_FILE if compact else None)


def prompt_ids(tok, instruction):
    return tok.encode(format_prompt(instruction))


def answer_ids(tok, sections, compact, max_tokens):
    """The answer's tokens, cut to max_tokens - 1, then <|endoftext|>."""
    return tok.encode(format_answer(sections, compact=compact))[: max_tokens - 1] + [tok.eot]


def parse_answer(text):
    """Split an answer into its sections; tolerant: missing sections are '' and text before the
    first tag is ignored. Used for reference records and for generated answers alike."""
    parts = SECTION_RE.split(text.replace("<|endoftext|>", ""))
    sections = {name: "" for name in SECTIONS}
    for name, body in zip(parts[1::2], parts[2::2], strict=False):
        if not sections[name]:  # first occurrence wins
            sections[name] = body.strip()
    return sections


# -----------------------------------------------------------------------------
# Records


def parse_record(obj, where):
    """Record from one APIBench JSON object; raises DataError naming `where` and what is missing."""
    if not isinstance(obj, dict) or not isinstance(obj.get("code"), str):
        raise DataError(f"{where}: no 'code' string field")
    m = re.match(r"\s*###\s?Instruction:(.*?)###\s?Output:(.*)\Z", obj["code"], re.S)
    if not m:
        raise DataError(f"{where}: 'code' lacks '###Instruction:' ... '###Output:'")
    instruction = re.split(r"###\s?Input:", m.group(1))[0].strip()  # a few records add ###Input:
    sections = parse_answer(m.group(2))
    missing = [s for s in REQUIRED if not sections[s]]
    if missing:
        raise DataError(
            f"{where}: answer lacks section(s) {', '.join('<<<%s>>>' % s for s in missing)}"
        )
    return Record(where_line(where), instruction, sections, obj.get("api_data") or {})


def where_line(where):
    return int(where.rsplit(":", 1)[1])


def load_records(path=EVAL_FILE, skip_bad=False, log=print):
    """Records of a JSON-lines file. A malformed line raises DataError with file:line and the
    reason, or, with skip_bad, is skipped and counted (the count and each reason are printed)."""
    records, skipped = [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
                records.append(parse_record(obj, f"{path}:{i}"))
            except DataError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
    if skipped:
        log(
            f"[data] skipped {len(skipped)} malformed record(s) of "
            f"{path.name if hasattr(path, 'name') else path}:"
        )
        for s in skipped:
            log(f"[data]   {s}")
    return records


TEST_PERCENT = 20  # the held-out test questions: hash buckets 0-19, whatever val_percent is
VAL_PERCENT = 5  # validation: the next buckets (5: 51 questions; 20: 190)


def split_of(record, val_percent=VAL_PERCENT, test_percent=TEST_PERCENT):
    """Deterministic split by a stable hash of the instruction (same on every machine and run).
    Validation takes the buckets after the test's, so a larger val_percent keeps the same test
    questions and the smaller validation set's, and takes the rest from train."""
    bucket = int(hashlib.sha256(record.instruction.encode()).hexdigest(), 16) % 100
    return (
        "test"
        if bucket < test_percent
        else "val"
        if bucket < test_percent + val_percent
        else "train"
    )


def offline_splits(records, val_percent=VAL_PERCENT):
    """[offline stand-in] APIBench's train file is not available offline: a hash split of the eval
    file."""
    out = {"train": [], "val": [], "test": []}
    for r in records:
        out[split_of(r, val_percent)].append(r)
    return out


HUB_TRAIN = "hub"  # train_file value: APIBench's huggingface_train.json from the Hub dataset


def load_splits(train_file="", val_percent=VAL_PERCENT, log=print):
    """train / val / test records. Test and validation are always held-out parts of the eval file
    (val_percent of it validation). train_file: "" (the rest of the eval file), "hub" (APIBench's
    train file), or a local file of that schema; a train file without one usable record ends the
    program, naming the file, the line and the reason."""
    splits = offline_splits(load_records(EVAL_FILE, skip_bad=True, log=log), val_percent)
    if train_file:
        log(
            "[data] split: train = "
            f"{'APIBench huggingface_train.json (Hub)' if train_file == HUB_TRAIN else train_file}"
            ", test = held-out eval records"
        )
        try:
            splits["train"] = train_records(train_file, log=log)
        except DataError as e:
            raise SystemExit(f"--train-file: {e}") from None
    else:
        log(
            "[data] split: OFFLINE stand-in - APIBench's train file is not available here, so the "
            "eval file is split by a stable hash of the instruction "
            f"({TEST_PERCENT}% test, {val_percent}% val, {100 - TEST_PERCENT - val_percent}% train)"
        )
    log(
        f"[data] train {len(splits['train'])}, val {len(splits['val'])}, "
        f"test {len(splits['test'])} records"
    )
    return splits


def run_splits(cfg, log=print):
    """load_splits with a run's settings (cfg.train_file, cfg.val_percent): how every stage gets
    its splits, so that a setting of the split reaches them all."""
    return load_splits(cfg.train_file, cfg.val_percent, log=log)


def train_records(train_file, log=print):
    """APIBench's huggingface_train.json: from the Hub dataset gorilla-llm/APIBench through
    `datasets` (online), or a local copy, read line by line (JSON lines, as APIBench ships it).
    Malformed records are skipped and named; a file without one usable record is refused (DataError:
    file, line, what is missing), before any stage trains on it."""
    if train_file == HUB_TRAIN:
        from datasets import load_dataset

        name = "gorilla-llm/APIBench/huggingface_train.json"
        hub = load_dataset(
            "gorilla-llm/APIBench", data_files="huggingface_train.json", split="train"
        )
        rows = enumerate(hub, 1)
    else:
        name, rows = train_file, json_lines(train_file)
    records, bad = [], []
    for i, obj in rows:
        try:
            records.append(parse_record(obj, f"{name}:{i}"))
        except DataError as e:
            bad.append(str(e))
            log(f"[data]   skipped {e}")
    if not records:
        raise DataError(
            f"{name}: no usable record"
            + (f" ({len(bad)} malformed; the first: {bad[0]})" if bad else " (the file is empty)")
        )
    log(f"[data] train file: {len(records)} records, {len(bad)} skipped")
    return records


def json_lines(path):
    """(line number, object) of a JSON-lines file; a line that is not JSON is a DataError naming
    it."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not JSON ({e.msg} at column {e.colno})") from None


# -----------------------------------------------------------------------------
# The API database (936 entries): the judge's documentation and the AST metric's reference


def load_api_database(path=API_FILE):
    apis = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    apis.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})"
                    ) from None
    return apis


def api_database_pairs(apis):
    """[offline stand-in] Extra SFT pairs from the API database (description + domain -> api_call),
    so a small model trained from scratch sees every real api_call at least once (the paper config:
    off)."""
    pairs = []
    for a in apis:
        instruction = f"I need a {a['domain']} model. {a['description']}".strip()
        code = a.get("example_code")
        sections = dict(
            domain=a["domain"],
            api_call=a["api_call"],
            api_provider=a["framework"],
            explanation="",
            code=code if isinstance(code, str) and code != "N/A" else "",
        )
        pairs.append(Record(0, instruction, sections, a))
    return pairs


def load_gorilla_answers(path=GORILLA_ANSWERS_FILE):
    """Gorilla-7B's published answers {question_id: text}. Their newlines and quotes are escaped
    ('\\n', '\\"') and 896 of the 904 end with a stray '"' left by Gorilla's formatting; undone
    here."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                out[obj["question_id"]] = unescape_gorilla(obj["text"])
    return out


def unescape_gorilla(text):
    text = text.replace("\\n", "\n").replace('\\"', '"').rstrip()
    return text[:-1] if text.endswith('"') else text


def build_vocab(out=VOCAB_FILE):
    """The tiny preset's compact vocabulary: every GPT-2 token of the eval and API files, plus the
    256 single-byte tokens (so any text still encodes) and <|endoftext|>."""
    from model import (
        gpt2_encoding,
    )  # here, not at the top: the sandbox child imports this module, not torch

    enc = gpt2_encoding()
    ids = {enc.encode_single_token(bytes([b])) for b in range(256)}
    for path in (EVAL_FILE, API_FILE):
        text = path.read_text().replace("\\n", "\n")
        for line in text.splitlines():
            ids.update(enc.encode_ordinary(line + "\n"))
    ids = sorted(ids) + [50256]
    out.write_text(json.dumps(ids))
    return ids


def main():
    import argparse

    argparse.ArgumentParser(
        description="Print the offline splits of the Gorilla eval file and the API database "
        "size, and rebuild the tiny preset's compact vocabulary (data/gorilla/vocab.json). "
        "Run from the repository root: python -m data.gorilla.prepare"
    ).parse_args()
    records = load_records(EVAL_FILE, skip_bad=True)
    splits = offline_splits(records)
    print({k: len(v) for k, v in splits.items()}, "records (offline hash split of the eval file)")
    print(len(load_api_database()), "API database entries")
    print(len(build_vocab()), "compact vocabulary size ->", VOCAB_FILE)


if __name__ == "__main__":
    main()
