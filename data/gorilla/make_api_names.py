"""Generate api_names.json: the names and call signatures the offline executability check knows. Run
once, with transformers at the version requirements-dev.txt pins (the one place it is pinned; this
script refuses another) and the other checked libraries at versions that work with it:

    pip install -r requirements-dev.txt diffusers==0.35.2 \\
        sentence-transformers==5.1.2 "datasets<4.4"
    python data/gorilla/make_api_names.py

Recorded, for each checked module: its public names, and the call signature of each public class (a
model's `forward`, a pipeline's or processor's `__call__`); for transformers.pipeline: the task
names, each task's `__call__` signature and the model types its Auto mappings load, and each model
class's type. Gorilla's answers were written for transformers 4.x; 5.x removed names they use
(ViTFeatureExtractor, several pipeline tasks).
"""

import importlib
import inspect
import json
from pathlib import Path

CHECKED = (
    "transformers",
    "torch",
    "torch.nn",
    "torch.nn.functional",
    "diffusers",
    "sentence_transformers",
    "datasets",
)
KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "p",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "pk",
    inspect.Parameter.VAR_POSITIONAL: "*",
    inspect.Parameter.KEYWORD_ONLY: "k",
    inspect.Parameter.VAR_KEYWORD: "**",
}


def params(fn):
    """[[name, kind, required], ...] without self; None when it accepts
    anything (only *args, **kwargs)."""
    try:
        ps = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    ps = ps[1:] if ps and ps[0].name == "self" else ps
    if {p.kind for p in ps} == {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
        return None
    return [
        [
            p.name,
            KINDS[p.kind],
            p.default is inspect.Parameter.empty and KINDS[p.kind] in ("p", "pk", "k"),
        ]
        for p in ps
    ]


def call_of(cls):
    """What calling an instance runs: forward for torch modules, __call__ otherwise."""
    import torch

    fn = (
        cls.forward
        if issubclass(cls, torch.nn.Module)
        else cls.__dict__.get("__call__") or cls.__call__
    )
    return None if fn is object.__call__ else params(fn)


def task_model_types(task_entry):
    """Model types (config.model_type) the task's Auto classes can load
    (the pipeline's `pt` entry)."""
    return sorted(
        {
            t
            for auto in task_entry.get("pt", ())
            for t in getattr(auto, "_model_mapping", {}) and auto._model_mapping._model_mapping
        }
    )


def class_model_types():
    """{model class name: its model type}, from every Auto mapping of transformers."""
    from transformers.models.auto import modeling_auto

    out = {}
    for name in dir(modeling_auto):
        if name.endswith("_MAPPING_NAMES"):
            for model_type, classes in getattr(modeling_auto, name).items():
                for c in classes if isinstance(classes, (list, tuple)) else [classes]:
                    out.setdefault(c, model_type)
    return out


def pinned_transformers():
    text = (Path(__file__).resolve().parents[2] / "requirements-dev.txt").read_text()
    return next(
        line.split("==")[1].split()[0]
        for line in text.splitlines()
        if line.startswith("transformers==")
    )


if __name__ == "__main__":
    import transformers
    from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES

    if transformers.__version__ != pinned_transformers():
        raise SystemExit(
            f"transformers {transformers.__version__} is installed; requirements-dev.txt pins "
            f"{pinned_transformers()}, the version the checker's names must come from"
        )
    names, calls = {}, {}
    for m in CHECKED:
        module = importlib.import_module(m)
        names[m] = sorted(n for n in dir(module) if not n.startswith("__"))
        for n in names[m]:
            try:
                obj = getattr(module, n)
            except Exception:  # a lazy import that fails: the name exists, its signature is unknown
                continue
            if inspect.isclass(obj) and (sig := call_of(obj)) is not None:
                calls.setdefault(m, {})[n] = sig
    tasks = {
        t: dict(call=params(d["impl"].__call__), model_types=task_model_types(d))
        for t, d in SUPPORTED_TASKS.items()
    }
    out = dict(
        versions={
            m: importlib.import_module(m).__version__
            for m in ("transformers", "torch", "diffusers", "sentence_transformers", "datasets")
        },
        modules=names,
        calls=calls,
        pipeline_tasks=sorted(set(SUPPORTED_TASKS) | set(TASK_ALIASES)),
        task_aliases=TASK_ALIASES,
        tasks=tasks,
        model_types=class_model_types(),
    )
    path = Path(__file__).with_name("api_names.json")
    path.write_text(json.dumps(out, separators=(",", ":")))
    print(
        f"{path}: {path.stat().st_size / 1e6:.1f} MB; "
        + ", ".join(f"{m} {len(v)} names" for m, v in names.items())
    )
