"""The project's shape: imports run one way, every script explains itself, settings are checked
before any work, and the documentation's command lines are ones the scripts accept."""

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# model (the network) <- the plumbing: distributed (torchrun) <- runs (run directories) <-
# training (what the stages train with) <- config (Config, its checks and flags) <- data (with the
# sandbox's stand-in libraries) <- sandbox <- the stages: sft, judge (the AI feedback) <- reward
# (the reward model) <- ppo, dpo, evaluate <- rlaif. A module imports only lower layers (ppo and
# evaluate ask the judge to score answers, dpo trains on the reward model's pairs, evaluate runs
# code through the sandbox). model imports none of them, not even the plumbing, so that it can be
# copied alone (test_model_py_imports_only_the_standard_library_and_torch).
LAYER = {
    "model": 0,
    "distributed": 1,
    "runs": 2,
    "training": 3,
    "config": 4,
    "data": 5,
    "sandbox": 6,
    "sft": 7,
    "judge": 7,
    "reward": 8,
    "ppo": 9,
    "dpo": 9,
    "evaluate": 9,
    "rlaif": 10,
}
PLUMBING = ("distributed", "runs", "training", "config")
ALLOWED = set()
SCRIPTS = [
    "rlaif.py",
    "sft.py",
    "ppo.py",
    "judge.py",
    "reward.py",
    "dpo.py",
    "evaluate.py",
    "sandbox.py",
    "data/gorilla/prepare.py",
]


def project_imports(path):
    """Top-level project modules that `path` imports, wherever in the file the import statement
    is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in LAYER}
    return found


def test_imports_run_one_way():
    modules = [ROOT / f"{m}.py" for m in LAYER if m != "data"] + sorted(
        (ROOT / "data" / "gorilla").glob("*.py")
    )
    wrong = []
    for path in modules:
        own = "data" if "data" in path.parts[-3:-1] else path.stem
        for imported in project_imports(path) - {own}:
            if LAYER[imported] >= LAYER[own] and (own, imported) not in ALLOWED:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, wrong


def test_each_plumbing_name_is_imported_from_its_home():
    """A name of the plumbing has one home: `from runs import X` only where runs.py defines X, so
    that no plumbing file passes on another's names (a reader who looks for X in the file it is
    imported from finds it there)."""
    defined = {}
    for module in PLUMBING:
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        defined[module] = {
            n.id if isinstance(n, ast.Name) else n.name
            for node in tree.body
            for n in (
                [node]
                if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                else [t for t in ast.walk(node) if isinstance(t, ast.Name)]
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                else []
            )
        }
    wrong = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("tests/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in PLUMBING and node.level == 0:
                wrong += [
                    f"{path.relative_to(ROOT)}: {a.name} from {node.module}"
                    for a in node.names
                    if a.name not in defined[node.module]
                ]
    assert not wrong, wrong


def import_time_modules(path):
    """Top-level names of the modules `path` imports when it is imported: imports in its module and
    class bodies, not those inside functions (which run only when the function is called)."""
    found = set()

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.add(child.module.split(".")[0] if child.level == 0 else "." * child.level)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_model_py_imports_only_the_standard_library_and_torch():
    """model.py can be copied into another project alone (as nanoGPT's can): at import it needs
    only Python and torch; safetensors, huggingface_hub and tiktoken load inside the functions
    that use them."""
    extra = import_time_modules(ROOT / "model.py") - set(sys.stdlib_module_names) - {"torch"}
    assert not extra, f"model.py imports {sorted(extra)} at import time"


@functools.lru_cache(maxsize=None)
def help_text(script):  # once per script per session: two tests read it
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, (script, out.stderr[-2000:])
    return out.stdout


@pytest.mark.slow  # a new Python process per script
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script):
    text = help_text(script)
    assert len(text) > 200 and "usage" in text.lower()
    if script in ("rlaif.py", "evaluate.py", "sandbox.py"):
        assert "default" in text  # settings show their defaults


def test_rlaif_help_shows_each_default_within_45_flags():
    """At most 45 flags (issue 47); --set's help names every other section setting at its
    default."""
    text = help_text("rlaif.py")
    assert len(re.findall(r"^  --", text, re.M)) <= 45
    text = re.sub(r"\s+", " ", text)
    for flag, default in (
        ("--sft-steps", "800"),
        ("--ppo-lr", "2e-05"),
        ("--judge", "rules"),
        ("--exec-mode", "offline"),
    ):
        assert re.search(re.escape(flag) + r".*?\(default: " + re.escape(default), text), flag
    for setting in ("init_kl_coef=0.05", "max_contrast_pairs=4", "tools=true", "warmup=50"):
        assert setting in text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--exec-mode", "Offline"], "offline"),
        (["--judge", "foo"], "rules"),
        (["--no-such-flag"], "unrecognized"),
        (["--config", "huge"], "paper"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, argv, needle, capsys):
    import rlaif

    with pytest.raises(SystemExit) as stop:
        rlaif.main(["--run-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err, err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_unreachable_judge_and_missing_gpu_fail_in_one_message(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    out = subprocess.run(
        [
            sys.executable,
            "rlaif.py",
            "--run-dir",
            str(tmp_path / "run"),
            "--judge",
            "openai",
            "--device",
            "cuda:0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("OPENAI")},
    )
    assert out.returncode == 1 and "cannot start" in out.stderr, out.stderr
    if "no CUDA" not in out.stderr:
        pytest.skip("a GPU is visible here")
    assert "OPENAI_API_KEY" in out.stderr and "--judge-base-url" in out.stderr
    assert not (tmp_path / "run").exists()


def documented_commands():
    """(file, script, flags) of every `python X.py ...` command line in README.md and docs/."""
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(
            r"python (?:-m )?([\w/.]+\.py|data\.gorilla\.prepare)((?: [^\s`|#;&]+)*)",
            doc.read_text(),
        ):
            script = m.group(1).replace("data.gorilla.prepare", "data/gorilla/prepare.py")
            # after `--`: another program's
            flags = re.findall(r"(--[a-z][a-z0-9-]*)", m.group(2).split(" -- ")[0])
            yield doc.name, script, flags


@pytest.mark.slow  # a new Python process per script
def test_documented_command_lines_use_real_flags():
    helps, wrong, seen = {}, [], 0
    for doc, script, flags in documented_commands():
        if not (ROOT / script).exists():
            wrong.append(f"{doc}: {script} does not exist")
            continue
        seen += 1
        if script not in helps:
            helps[script] = help_text(script)
        text = helps[script]
        wrong += [
            f"{doc}: {script} {f}" for f in flags if not re.search(re.escape(f) + r"\b", text)
        ]
    assert seen >= 5 and not wrong, wrong


def test_readme_is_short_and_functions_fit_on_a_screen():
    assert len((ROOT / "README.md").read_text()) <= 8000
    core = [ROOT / f"{m}.py" for m in LAYER if m != "data"] + sorted(
        (ROOT / "data" / "gorilla").glob("*.py")
    )
    long = []
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.name} {lines} lines")
    assert not long, long


@pytest.mark.parametrize("script", ["sft", "judge", "reward", "ppo", "dpo", "evaluate"])
def test_stage_script_without_a_run_says_how_to_make_one(script, tmp_path, monkeypatch):
    """With no flags a stage script works on runs/tiny; where that run does not exist it says, in
    one line, the command that makes it (and starts nothing). In-process: main() with no
    arguments."""
    import importlib

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main([])
    message = str(stop.value)
    assert len(message.splitlines()) == 1 and "python rlaif.py --run-dir runs/tiny" in message, (
        message
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a new Python process per script
def test_dry_run_of_the_paper_configuration_prints_the_plan_offline(tmp_path):
    """--dry-run --config paper: the plan with the judge's cost, exit 0, nothing written, and (where
    a network namespace can be made) no network to reach at all."""
    import shutil

    isolate = (
        ["unshare", "-rn"]
        if shutil.which("unshare")
        and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
        else []
    )
    out = subprocess.run(
        isolate + [sys.executable, str(ROOT / "rlaif.py"), "--dry-run", "--config", "paper"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in __import__("os").environ.items() if not k.startswith("OPENAI")},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gpt2-large" in out.stdout and "requests" in out.stdout and "$" in out.stdout
    # the judge is sized on the Hub split's sampled instructions, not the offline split's 660
    import rlaif
    from judge import QUESTIONS

    cfg = rlaif.make_config("paper")
    requests = cfg.sampled_instructions * cfg.answers_per_instruction * len(QUESTIONS)
    assert f" {requests:,} requests" in out.stdout, out.stdout
    for stage in ("sft", "sample", "feedback", "reward", "ppo", "evaluate"):
        assert f"  {stage}" in out.stdout
    assert not any(tmp_path.iterdir())  # nothing written


def test_evaluate_of_a_run_refuses_flags_that_only_apply_to_other_sources(capsys):
    import evaluate

    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--exec-mode", "none", "--device", "cuda"])
    assert stop.value.code == 2
    assert (
        "--exec-mode --device apply to --answers, --model or --gorilla" in capsys.readouterr().err
    )


def test_the_driver_runs_the_stages_in_their_order():
    import rlaif
    from runs import STAGE_ORDER

    assert tuple(rlaif.STAGES) == STAGE_ORDER
