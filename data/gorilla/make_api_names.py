"""Generate api_names.json, the public names the offline executability check knows (run once, with the
test-only packages of requirements-dev.txt installed; the output is committed):

    python data/gorilla/make_api_names.py

For each checked module: its public names. For transformers.pipeline: the task names it accepts.
"""
import importlib
import json
from pathlib import Path

CHECKED = ("transformers", "torch", "torch.nn", "torch.nn.functional")

if __name__ == "__main__":
    import transformers
    from transformers.pipelines import SUPPORTED_TASKS, TASK_ALIASES
    names = {m: sorted(n for n in dir(importlib.import_module(m)) if not n.startswith("__")) for m in CHECKED}
    out = dict(versions={"transformers": transformers.__version__,
                         "torch": importlib.import_module("torch").__version__},
               modules=names, pipeline_tasks=sorted(set(SUPPORTED_TASKS) | set(TASK_ALIASES)))
    path = Path(__file__).with_name("api_names.json")
    path.write_text(json.dumps(out, indent=0))
    print(f"{path}: " + ", ".join(f"{m} {len(v)} names" for m, v in names.items()))
