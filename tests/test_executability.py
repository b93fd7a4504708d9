"""The sandboxed executability check: labelled snippets (real Gorilla reference code and
deliberately broken variants) and hostile snippets that must be contained."""

import os
import re
import time

import pytest

from data.gorilla import prepare
from sandbox import Sandbox

# Reference code sections of the test split, read by hand: each uses only real transformers names
# and model ids of the API database, and defines every name it uses. Label: executable.
REFERENCE_LINES = (32, 37, 51, 56, 63, 66, 146, 148, 207, 209)


def mutations(code):
    """(label, code) variants of an executable snippet, each broken in one known way."""
    first_id = re.search(r"'([\w.-]+/[\w.-]+)'", code).group(1)
    first_name = re.search(r"from transformers import (\w+)", code).group(1)
    last = code.rstrip().rsplit(")", 1)
    return [
        ("executable", code),
        ("syntax", last[0] + last[1] if len(last) == 2 else code + "(("),
        ("hallucinated_api", re.sub(rf"\b{first_name}\b", first_name + "Plus", code)),
        ("hallucinated_api", code.replace(first_id, "nobody/no-such-model")),
        ("import", "import transformerz\n" + code),
        ("runtime", code + "\nprint(undefined_variable_xyz)"),
    ]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(timeout=10)


# slow: every labelled snippet runs through the sandbox, two processes each
@pytest.mark.slow
def test_labelled_snippets_get_their_labels(sandbox):
    by_line = {
        r.line: r
        for r in prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    }
    labelled = [m for line in REFERENCE_LINES for m in mutations(by_line[line].sections["code"])]
    labelled += [
        ("executable", "import numpy as np\nx = np.arange(6).reshape(2, 3)\nprint(x.sum(axis=0))"),
        ("runtime", "import numpy as np\nnp.zeros(3) @ np.zeros(4)"),
        ("no_code", "   \n"),
    ]
    assert len(labelled) >= 40
    verdicts = sandbox.run_all([code for _, code in labelled])
    wrong = [
        (label, v, code[:80])
        for (label, code), v in zip(labelled, verdicts, strict=True)
        if v[0] != label
    ]
    assert not wrong, wrong


# One snippet per checker rule (docs/metrics.md), each beside the variant the rule must refuse.
RULES = [
    ("executable", "import json\nconfig = json.load(open('config.json'))\nprint(config['labels'])"),
    (
        "executable",
        "with open('clip.wav', 'rb') as f:\n"
        "    audio = f.read()\n"
        "import pathlib\n"
        "t = pathlib.Path('a.txt').read_text()",
    ),
    (
        "executable",
        "open('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'",
    ),  # real files stay real
    (
        "executable",
        "import requests\n"
        "from io import BytesIO\n"
        "from PIL import Image\n"
        "image = Image.open(BytesIO(requests.get('https://x.org/a.jpg').content))\n"
        "b = BytesIO()\n"
        "b.write(b'x')",
    ),
    ("executable", "clip = load_video_clip()  # Replace with your video loading code\nprint(clip)"),
    ("runtime", "clip = load_video_clip()\nprint(clip)"),
    (
        "executable",
        "from transformers import pipeline\n"
        "c = pipeline('image-classification', model='google/vit-base-patch16-224')\n"
        "print(c('cat.jpg', top_k=2))",
    ),
    (
        "runtime",
        "from transformers import pipeline\n"
        "c = pipeline('image-classification', model='google/vit-base-patch16-224')\n"
        "print(c('cat.jpg', ['cat', 'dog']))",
    ),
    (
        "runtime",
        "from transformers import pipeline\n"
        "c = pipeline('image-classification', model='google/vit-base-patch16-224')\n"
        "print(c(path='cat.jpg'))",
    ),
    (
        "executable",
        "from diffusers import ControlNetModel\n"
        "import torch\n"
        "net = ControlNetModel.from_pretrained('lllyasviel/sd-controlnet-canny').to('cuda')\n"
        "out = net(torch.zeros(1), 10, torch.zeros(1), torch.zeros(1))",
    ),
    (
        "runtime",
        "from diffusers import ControlNetModel\n"
        "import torch\n"
        "net = ControlNetModel.from_pretrained('lllyasviel/sd-controlnet-canny').to('cuda')\n"
        "out = net(torch.zeros(1))",
    ),
    (
        "executable",
        "from transformers import ViTForImageClassification, ViTImageProcessor\n"
        "p = ViTImageProcessor.from_pretrained('google/vit-base-patch16-224')\n"
        "m = ViTForImageClassification.from_pretrained('google/vit-base-patch16-224')\n"
        "inputs = p(images='x.jpg', return_tensors='pt')\n"
        "out = m(**inputs)",
    ),
    (
        "hallucinated_api",
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer('nobody/no-such-model')",
    ),
    (
        "executable",
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer('sentence-transformers/all-MiniLM-L6-v2')\n"
        "m.encode(['a b'])",
    ),
    (
        "hallucinated_api",
        "from huggingface_hub import hf_hub_download\n"
        "hf_hub_download(repo_id='nobody/no-such', filename='m.bin')",
    ),
    (
        "executable",
        "from datasets import load_dataset\nd = load_dataset('some-user/some-dataset')",
    ),  # not a model id
    (
        "executable",
        "from speechbrain.pretrained import EncoderClassifier\n"
        "c = EncoderClassifier.from_hparams(source='speechbrain/spkrec-xvect-voxceleb', "
        "savedir='pretrained_models/spkrec-xvect-voxceleb')",
    ),
    (
        "hallucinated_api",
        "from speechbrain.pretrained import EncoderClassifier\n"
        "c = EncoderClassifier.from_hparams(source='speechbrain/spkrec-made-up', "
        "savedir='pretrained_models/x')",
    ),
    (
        "executable",
        "from stable_baselines3.common.env_util import make_vec_env\n"
        "env = make_vec_env('seals/CartPole-v0')",
    ),
    ("hallucinated_api", "from diffusers import StableDiffusionTurboPipelineXL"),
    ("hallucinated_api", "from transformers import pipeline\nt = pipeline('translation_to_en')"),
    (
        "executable",
        "from transformers import pipeline\n"
        "t = pipeline('translation_en_to_fr', model='Helsinki-NLP/opus-mt-en-fr')",
    ),
    (
        "runtime",
        "from transformers import pipeline\n"
        "f = pipeline('fill-mask', model='distilroberta-base')\n"
        "f('Paris is nice.')",
    ),
    (
        "executable",
        "from transformers import pipeline\n"
        "f = pipeline('fill-mask', model='distilroberta-base')\n"
        "s = 'Paris is the <mask> of France.'\n"
        "print(s.replace('<mask>', f(s)[0]['token_str']))",
    ),
    (
        "executable",
        "import numpy as np\n"
        "from PIL import Image\n"
        "img = np.array(Image.open('cat.jpg'))\n"
        "print(img[:, :, 0].mean() / 255.0, round(img.mean(), 2))",
    ),
    (
        "runtime",
        "from transformers import pipeline\n"
        "v = pipeline('image-to-text', model='Salesforce/blip2-opt-2.7b')\n"
        "t = pipeline('text2text-generation', model='Salesforce/blip2-opt-2.7b')\n"
        "t('a.jpg')",
    ),
]


@pytest.mark.slow  # every rule's snippets through the sandbox
def test_each_checker_rule_and_its_counterexample(sandbox):
    verdicts = sandbox.run_all([code for _, code in RULES])
    wrong = [
        (label, v, code) for (label, code), v in zip(RULES, verdicts, strict=True) if v[0] != label
    ]
    assert not wrong, wrong
    assert verdicts[0][1] == "placeholder inputs: config.json"  # counted beside the rate
    assert verdicts[2][1] == ""  # a file the snippet wrote itself is no placeholder


HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "sleep forever": "import time\ntime.sleep(10**6)",
    "C-level busy loop": "sum(range(10**13))",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "multiprocessing": "import multiprocessing as mp\nmp.Process(target=print).start()",
    "huge allocation": "x = bytearray(50 * 2**30)",
    "growing list": "x = []\nwhile True:\n    x.append(' ' * 10**6)",
    "write outside": "open({sentinel!r}, 'w').write('pwned')",
    "append outside": "with open({sentinel!r}, 'a') as f:\n    f.write('pwned')",
    "delete outside": "import os\nos.remove({sentinel!r})",
    "rmtree outside": "import shutil\nshutil.rmtree({sentinel_dir!r})",
    "rename outside": "import os\nos.rename({sentinel!r}, {sentinel!r} + '.moved')",
    "chmod outside": "import os\nos.chmod({sentinel!r}, 0)",
    "pathlib write": "import pathlib\npathlib.Path({sentinel!r}).write_text('pwned')",
    "read environment": "import os\nassert 'RLAIF_TEST_SECRET' not in os.environ",
    "socket connect": "import socket\n"
    "s = socket.socket()\n"
    "s.settimeout(2)\n"
    "s.connect(('127.0.0.1', 22))",
    "socket server": "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()",
    "dns lookup": "import socket\nsocket.getaddrinfo('example.com', 80)",
    "shell via subprocess": "import subprocess\n"
    "subprocess.run(['sh', '-c', 'touch {sentinel}.sh'])",
    "os.system": "import os\nos.system('touch {sentinel}.sys')",
    "exec a shell": "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {sentinel}.exec'])",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "ctypes": "import ctypes\nctypes.CDLL(None).system(b'touch {sentinel}.ctypes')",
    "huge file": "with open('big', 'wb') as f:\n    f.write(b'x' * 100 * 2**20)",
    "huge output": "while True:\n    print('x' * 10**6)",
    "recursion": "def f():\n    return f()\nf()",
}


@pytest.mark.slow
def test_hostile_snippets_are_contained(tmp_path, monkeypatch):
    sentinel_dir = tmp_path / "host"
    sentinel_dir.mkdir()
    sentinel = sentinel_dir / "precious.txt"
    sentinel.write_text("original")
    monkeypatch.setenv("RLAIF_TEST_SECRET", "s3cret")
    sandbox = Sandbox(timeout=3, memory_mb=1024)
    codes = [
        c.format(sentinel=str(sentinel), sentinel_dir=str(sentinel_dir)) for c in HOSTILE.values()
    ]
    t0 = time.time()
    verdicts = sandbox.run_all(codes)  # in parallel, as evaluation runs them
    # each within its limit
    assert time.time() - t0 < len(codes) / sandbox.workers * (sandbox.timeout + 5)
    assert len(HOSTILE) >= 20
    assert sentinel.read_text() == "original"
    # nothing created or moved
    assert sorted(p.name for p in sentinel_dir.iterdir()) == ["precious.txt"]
    assert os.stat(sentinel).st_mode & 0o777 != 0
    results = dict(zip(HOSTILE, verdicts, strict=True))
    assert results["read environment"][0] == "executable"  # ran, and saw no secret
    # Containment is the operating system's (asserted above); these must also *fail* as snippets.
    for name in (
        "infinite loop",
        "sleep forever",
        "C-level busy loop",
        "fork bomb",
        "huge allocation",
        "growing list",
        "write outside",
        "append outside",
        "delete outside",
        "pathlib write",
        "huge file",
        "huge output",
        "recursion",
        "shell via subprocess",
        "os.system",
    ):
        assert results[name][0] != "executable", (name, results[name])
    print(
        f"\n{len(HOSTILE)} hostile snippets in {time.time() - t0:.1f}s: "
        + ", ".join(f"{k}: {v[0]}" for k, v in results.items())
    )


def test_checker_names_come_from_the_pinned_transformers():
    from pathlib import Path

    from data.gorilla.apis import library_names

    pin = next(
        line.split("==")[1].split()[0]
        for line in (Path(__file__).resolve().parent.parent / "requirements-dev.txt")
        .read_text()
        .splitlines()
        if line.startswith("transformers==")
    )
    known = library_names()
    assert known["versions"]["transformers"] == pin
    # 4.x names Gorilla's answers use
    assert "ViTFeatureExtractor" in known["modules"]["transformers"]
    assert known["tasks"]["image-classification"]["call"][0][:2] == ["inputs", "pk"]
