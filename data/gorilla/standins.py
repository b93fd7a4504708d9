"""
[offline stand-in] The model libraries as checking stand-ins, for the sandbox's offline mode
(sandbox.py). They live beside the API tables they check against (apis.py, api_names.json).

Offline there are no weights and no network, so inside the sandbox's child the libraries in
STUBBED are replaced by stand-ins that check what the code asks of them, against
data/gorilla/api_names.json (transformers 4.57.6): names a library does not have, calls that do
not fit the real signature, unknown pipeline tasks and models a task cannot run, model ids not in
the API database (HallucinatedAPI). Missing input files and names the code marks as the user's
are placeholders. Everything else really runs. Containment is not here: the operating system
isolates the child (sandbox.py).
"""

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
import sys
import types

from data.gorilla.apis import ID_KEYWORDS, MODEL_ID, library_names, placeholder_names

# Libraries replaced by checking stand-ins in offline mode: they load weights, read the snippet's
# placeholder inputs or reach the network. The first two are checked name by name (api_names.json).
STUBBED = (
    "transformers",
    "torch",
    "torchvision",
    "torchaudio",
    "diffusers",
    "sentence_transformers",
    "huggingface_hub",
    "datasets",
    "PIL",
    "requests",
    "soundfile",
    "librosa",
    "cv2",
    "pandas",
    "joblib",
    "fairseq",
    "speechbrain",
    "flair",
    "pyannote",
    "sklearn",
    "timm",
    "tensorflow",
    "keras",
    "ultralyticsplus",
    "controlnet_aux",
    "stable_baselines3",
    "rl_zoo3",
    "huggingsound",
    "asteroid",
    "espnet2",
    "espnet_model_zoo",
    "yolov5",
    "tuneavideo",
    "IPython",
    "skops",
    "dabl",
    "scipy",
    "matplotlib",
    "gym",
    "sb3_contrib",
    "tensorflow_hub",
    "onnxruntime",
    "optimum",
    "peft",
    "accelerate",
    "audiocraft",
    "bark",
    "TTS",
    "nemo",
    "paddlenlp",
    "lightgbm",
    "xgboost",
)


class HallucinatedAPI(Exception):
    pass


class Checks:
    """What the stand-ins know (api_names.json and the API database): public names of checked
    modules, call signatures, pipeline tasks, real model ids and the classes they load with; and
    what the snippet read that was a placeholder for the user's input."""

    names, calls, tasks, aliases, model_types, ids, id_class, placeholders = (
        {},
        {},
        {},
        {},
        {},
        set(),
        {},
        [],
    )


PARAM_KINDS = {
    "p": inspect.Parameter.POSITIONAL_ONLY,
    "pk": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "*": inspect.Parameter.VAR_POSITIONAL,
    "k": inspect.Parameter.KEYWORD_ONLY,
    "**": inspect.Parameter.VAR_KEYWORD,
}
FILE_EXT = re.compile(
    r".*\.(jpe?g|png|gif|bmp|webp|tiff?|wav|mp3|flac|ogg|m4a|mp4|avi|mov|mkv|csv|tsv|json|jsonl|"
    r"txt|pdf|docx?|xlsx?|parquet|pkl|pickle|joblib|npy|npz|pt|pth|bin|ckpt|h5|onnx|zip|"
    r"ya?ml|xml|html?|md|py)$",
    re.I,
)
# Calls whose 'org/name' strings are not models of the API database: dataset ids, GitHub repos, gym
# environments ('seals/CartPole-v0'). Keywords that carry a model id: apis.ID_KEYWORDS.
UNCHECKED_CALLS = re.compile(r"^(datasets|torch\.hub|gym|gymnasium)\.|env")
SAME_OBJECT = (".to", ".cuda", ".cpu", ".eval", ".train", ".half", ".float", ".requires_grad_")


def bind(where, params, args, kwargs):
    """Raise TypeError, as the real call would, when args/kwargs do not fit the
    recorded signature. `f(**stand_in)` passes unknown keywords (marked "__stub__"), so
    only what was given is checked."""
    given = {k: v for k, v in kwargs.items() if k != "__stub__"}
    sig = inspect.Signature(
        [
            inspect.Parameter(
                n,
                PARAM_KINDS[k],
                default=inspect.Parameter.empty if required or k in ("*", "**") else None,
            )
            for n, k, required in params
        ]
    )
    try:
        (sig.bind_partial if "__stub__" in kwargs else sig.bind)(*args, **given)
    except TypeError as e:
        raise TypeError(f"{where}(): {e}") from None


def check_ids(path, args, kwargs):
    """A Hub id ('org/name', not a file name) given to a stubbed library must be in the API
    database; any other string that names a file or URL is a placeholder for the user's input."""
    for key, value in [(None, a) for a in args] + list(kwargs.items()):
        if type(value) is not str:
            continue
        if FILE_EXT.fullmatch(value) or value.startswith(("http://", "https://")):
            Checks.placeholders.append(value)
        elif (
            MODEL_ID.fullmatch(value)
            and (key is None or key in ID_KEYWORDS)
            and not UNCHECKED_CALLS.search(path)
            and value not in Checks.ids
        ):
            raise HallucinatedAPI(f"{path}: model id {value!r} is not in the API database")


def pipeline_task(args, kwargs):
    task = args[0] if args else kwargs.get("task")
    if not isinstance(task, str):
        return None
    parts = task.split("_")
    if task.startswith("translation") and (
        task == "translation" or (len(parts) == 4 and parts[2] == "to")
    ):
        return "translation"  # transformers accepts translation_XX_to_YY only
    if task not in Checks.tasks and task not in Checks.aliases:
        raise HallucinatedAPI(f"pipeline: unknown task {task!r}")
    return Checks.aliases.get(task, task)


def call_pipeline(task, model_id, args, kwargs):
    """A pipeline call: the task's real __call__ signature, its model's fit,
    fill-mask's input contract."""
    info = Checks.tasks.get(task, {})
    if info.get("call") is not None:
        bind(f"{task} pipeline", info["call"], args, kwargs)
    model_type = Checks.model_types.get(Checks.id_class.get(model_id))
    if model_type and model_type not in info.get("model_types", (model_type,)):
        raise TypeError(
            f"{task} pipeline: {model_id} is a {model_type} model, which this task cannot run"
        )
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
    """The stand-in for `path.name`; refused when `path` is a checked
    module that has no such name."""
    if name.startswith("__"):
        raise AttributeError(name)
    if path in Checks.names and name not in Checks.names[path]:
        raise HallucinatedAPI(f"{path} has no attribute {name!r}")
    return Stub(f"{path}.{name}", ("same", kind) if kind and f".{name}" in SAME_OBJECT else None)


class Stub:
    """Stands in for any object of a stubbed library: checks names, ids and the calls it knows the
    real signature of, accepts the rest. _kind: ("pipeline", task, model id), ("instance", module,
    class), or ("same", kind) for a method such as .to() that returns its own object."""

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
        op = next(
            (i for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), None
        )
        n = op.arg if op is not None and op.opname == "UNPACK_SEQUENCE" else 1
        return iter([Stub(f"{self._path}[{i}]") for i in range(n)])

    def __getitem__(self, key):
        # result['label'] may be text: a stand-in that is also a str
        # (`s.replace('<mask>', r[0]['token_str'])`)
        return (StubStr if isinstance(key, str) else Stub)(self._path + "[]")

    def __array__(self, dtype=None, copy=None):
        # an image-shaped array: np.array(Image.open(p))[:, :, 0] works, as with a real image
        import numpy

        return numpy.zeros((4, 4, 3), dtype=dtype or numpy.float32)

    def keys(self):
        return ["__stub__"]  # `f(**outputs)`: keywords unknown (see bind)

    __setitem__ = __setattr__ = lambda self, key, value: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    __len__, __bool__, __index__, __int__, __float__ = (
        (lambda self: 1),
        (lambda self: True),
        (lambda self: 0),
        (lambda self: 0),
        (lambda self: 0.0),
    )
    __str__ = __format__ = lambda self, *spec: f"<{self._path}>"

    def __round__(self, *digits):
        return 0.0

    def __contains__(self, item):
        return False

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


class StubStr(Stub, str):
    """A stand-in that str's own methods accept as a string (empty); Stub's behaviour otherwise."""

    def __new__(cls, path, kind=None):
        return str.__new__(cls, "")


def _operator(self, *other):
    return Stub(self._path + "(op)")


for _op in (
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and",
    "or",
    "lt",
    "le",
    "gt",
    "ge",
    "neg",
    "pos",
    "abs",
    "invert",
):
    setattr(Stub, f"__{_op}__", _operator)
    setattr(Stub, f"__r{_op}__", _operator)


def placeholder_open(real_open):
    """open() that reads a missing file as the user's placeholder input: a stand-in file."""

    def open_(file, mode="r", *args, **kwargs):
        if (
            isinstance(file, (str, bytes, os.PathLike))
            and not set(str(mode)) & set("wax+")
            and not os.path.exists(file)
        ):
            Checks.placeholders.append(os.fsdecode(file))
            return Stub(f"placeholder file {os.fsdecode(file)!r}")
        return real_open(file, mode, *args, **kwargs)

    return open_


def read_placeholders(module, name):
    """module.name(file, ...) of a placeholder file gives a stand-in of its content."""
    real = getattr(module, name)
    setattr(
        module,
        name,
        lambda *a, **k: (
            Stub(f"{module.__name__}.{name}()") if a and isinstance(a[0], Stub) else real(*a, **k)
        ),
    )


def install_placeholder_policy(code):
    """One policy for every way of reading the user's input [offline stand-in]: a missing file
    read by open() (also pathlib, json, pickle, csv), a stand-in's bytes
    (`BytesIO(requests.get(url).content)`) or a file name or URL given to a stubbed library, and
    names the code marks as the user's, stand in for what the user would supply; the answers
    that relied on one are counted."""
    builtins.open = io.open = placeholder_open(io.open)
    for module, name in (
        (json, "load"),
        (pickle, "load"),
        (csv, "reader"),
        (csv, "DictReader"),
        (io, "BytesIO"),
    ):
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


def install(spec):
    """In the child, before the snippet runs: the stand-ins in place of STUBBED (an import hook) and
    the placeholder policy; returns the names to add to the snippet's globals."""
    known = library_names()
    Checks.names, Checks.calls, Checks.tasks = known["modules"], known["calls"], known["tasks"]
    Checks.aliases, Checks.model_types = known["task_aliases"], known["model_types"]
    Checks.ids, Checks.id_class = set(spec["ids"]), spec["id_class"]
    sys.meta_path.insert(0, StubFinder())
    return install_placeholder_policy(spec["code"])
