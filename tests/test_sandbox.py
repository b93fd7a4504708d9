"""The sandbox's isolation, tried the way an escaping snippet would: each payload is benign
(a marker file, a changed canary, a signal to a dummy process, a packet to a loopback
listener) and each must fail. The isolation is the operating system's (namespaces, read-only
mounts, uid 65534), not Python's."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sandbox import Sandbox, isolation_available

pytestmark = pytest.mark.skipif(
    isolation_available() is not None, reason="no OS-level isolation here"
)

ESCAPES = {
    "posixsubprocess fork_exec": "import _posixsubprocess, os\n"
    "_posixsubprocess.fork_exec(['/bin/sh', '-c', 'echo x > {marker}'], [b'/bin/sh'], True, "
    "(), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, False, False, None, None, None, "
    "-1, None, False)",
    "ctypes libc system": "import ctypes\nctypes.CDLL(None).system(b'echo x > {marker}')",
    "ctypes pythonapi": "import ctypes\nctypes.CDLL('libc.so.6').system(b'touch {marker}')",
    "hook disabled, then shell": "import sys, gc\n"
    "for o in gc.get_objects():\n"
    "    pass\n"
    "import subprocess\n"
    "try:\n"
    "    subprocess.run(['sh', '-c', 'touch {marker}'])\n"
    "except Exception:\n"
    "    pass\n"
    "import os\n"
    "os.system('touch {marker}')",
    "multiprocessing spawn": "import multiprocessing as mp\n"
    "ctx = mp.get_context('spawn')\n"
    "p = ctx.Process(target=open, args=({marker!r}, 'w'))\n"
    "p.start(); p.join()",
    "os.open O_TRUNC": "import os\nos.close(os.open({canary!r}, os.O_WRONLY | os.O_TRUNC))",
    "open via dir_fd": "import os\n"
    "d = os.open({canary_dir!r}, os.O_RDONLY)\n"
    "os.close(os.open('canary.txt', os.O_WRONLY | os.O_APPEND, dir_fd=d))",
    "remove via dir_fd": "import os\n"
    "d = os.open({canary_dir!r}, os.O_RDONLY)\n"
    "os.remove('canary.txt', dir_fd=d)",
    "os.replace over canary": "import os\n"
    "open('x', 'w').write('pwned')\n"
    "os.replace('x', {canary!r})",
    "shutil.move outside": "import shutil\n"
    "open('x', 'w').write('pwned')\n"
    "shutil.move('x', {marker!r})",
    "hard link then write": "import os\nos.link({canary!r}, 'l')\nopen('l', 'a').write('pwned')",
    "symlink outside": "import os\nos.symlink('/etc/passwd', {marker!r})",
    "fchmod canary": "import os\nfd = os.open({canary!r}, os.O_RDONLY)\nos.fchmod(fd, 0o777)",
    "chmod canary": "import os\nos.chmod({canary!r}, 0o777)",
    "utime canary": "import os\nos.utime({canary!r}, (0, 0))",
    "mknod": "import os, stat\nos.mknod({marker!r}, 0o600 | stat.S_IFREG)",
    "setxattr": "import os\nos.setxattr({canary!r}, 'user.pwned', b'1')",
    "kill the dummy": "import os, signal\nos.kill({dummy_pid}, signal.SIGTERM)",
    "killpg the dummy": "import os, signal\nos.killpg({dummy_pid}, signal.SIGTERM)",
    "pidfd_send_signal": "import os, signal\n"
    "signal.pidfd_send_signal(os.pidfd_open({dummy_pid}), signal.SIGTERM)",
    "UDP sendto": "import socket\n"
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
    ".sendto(b'escaped', ('127.0.0.1', {udp_port}))",
    "UDP sendmsg": "import socket\n"
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
    ".sendmsg([b'escaped'], [], 0, ('127.0.0.1', {udp_port}))",
    "TCP connect": "import socket\n"
    "s = socket.create_connection(('127.0.0.1', {tcp_port}), timeout=2)\n"
    "s.sendall(b'escaped')",
    "TCP fast open": "import socket\n"
    "s = socket.socket()\n"
    "s.sendmsg([b'escaped'], [], socket.MSG_FASTOPEN, ('127.0.0.1', {tcp_port}))",
    "unix socket": "import socket\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.sendto(b'escaped', {unix_path!r})",
    "parent environ via /proc": "import os\n"
    "for p in os.listdir('/proc'):\n"
    "    try:\n"
    "        if b'{secret}' in open(f'/proc/{{p}}/environ', 'rb').read():\n"
    "            raise SystemError('FOUND')\n"
    "    except OSError:\n"
    "        pass",
    "own environment": "import os\n"
    "if any('{secret}' in v for v in os.environ.values()):\n"
    "    raise SystemError('FOUND')",
    "setsid survivor": "import os, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    time.sleep(4)\n"
    "    open({marker!r}, 'w')\n"
    "    os._exit(0)\n"
    "time.sleep(60)",
    "daemon after exit": "import os, time\n"
    "if os.fork() == 0:\n"
    "    time.sleep(3)\n"
    "    open({marker!r}, 'w')\n"
    "    os._exit(0)",
    "immutable file in workdir": "import fcntl, os, struct\n"
    "fd = os.open('f', os.O_CREAT | os.O_RDONLY)\n"
    "fcntl.ioctl(fd, 0x40086602, struct.pack('i', 0x10))",
    "write the project": "open({project_file!r}, 'a').write('# pwned')",
    "write /tmp": "open('/tmp/rlaif-escape-marker', 'w')",
    "write /dev/shm": "open('/dev/shm/rlaif-escape-marker', 'w')",
    "remount read-write": "import ctypes\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "libc.mount(b'none', b'/', None, 32 | 4096, None)\n"
    "open({marker!r}, 'w')",
    "setuid root": "import os\nos.setuid(0)\nopen({marker!r}, 'w')",
    "via /proc/self/root": "open('/proc/self/root' + {marker!r}, 'w')",
    "via /proc/1/cwd": "open('/proc/1/cwd/../' + {marker_name!r}, 'w')",
}


class Listener:
    """UDP, TCP and Unix-datagram listeners on loopback that record anything they receive."""

    def __init__(self, tmp):
        self.got = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen()
        self.unix_path = str(tmp / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.unix.bind(self.unix_path)
        os.chmod(self.unix_path, 0o777)
        for sock in (self.udp, self.tcp, self.unix):
            sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while not self.stop:
            for sock in (self.udp, self.unix):
                try:
                    self.got.append(sock.recv(100))
                except OSError:
                    pass
            try:
                conn, _ = self.tcp.accept()
                self.got.append(conn.recv(100) or b"connected")
            except OSError:
                pass


@pytest.mark.slow
def test_escape_attempts_are_contained(tmp_path, monkeypatch):
    host = tmp_path / "host"
    host.mkdir()
    canary = host / "canary.txt"
    canary.write_text("original")
    os.chmod(canary, 0o644)
    before = os.stat(canary)
    marker = host / "marker"
    dummy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    listener = Listener(tmp_path)
    secret = "s3cret-value-42"
    monkeypatch.setenv("RLAIF_TEST_SECRET", secret)
    project_file = Path(__file__).resolve().parent.parent / "sandbox.py"
    project_before = project_file.read_bytes()
    fields = dict(
        marker=str(marker),
        marker_name=marker.name,
        canary=str(canary),
        canary_dir=str(host),
        dummy_pid=dummy.pid,
        udp_port=listener.udp.getsockname()[1],
        tcp_port=listener.tcp.getsockname()[1],
        unix_path=listener.unix_path,
        secret=secret,
        project_file=str(project_file),
    )
    try:
        verdicts = Sandbox(timeout=3).run_all([c.format(**fields) for c in ESCAPES.values()])
        time.sleep(5)  # anything that outlived its sandbox would act now
        assert len(ESCAPES) >= 30
        assert not marker.exists() and not Path("/tmp/rlaif-escape-marker").exists()
        assert not Path("/dev/shm/rlaif-escape-marker").exists()
        after = os.stat(canary)
        assert canary.read_text() == "original"
        assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
        assert os.listxattr(canary) == []
        assert dummy.poll() is None, "the dummy process was signalled"
        assert listener.got == [], listener.got
        assert project_file.read_bytes() == project_before
        results = dict(zip(ESCAPES, verdicts, strict=True))
        assert all("FOUND" not in detail for _, detail in results.values()), results
        assert results["immutable file in workdir"][0] != "crashed", results[
            "immutable file in workdir"
        ]
        leftover = subprocess.run(
            ["pgrep", "-u", "65534"], capture_output=True, text=True
        ).stdout.split()
        assert leftover == [], f"processes of the sandbox uid still alive: {leftover}"
    finally:
        listener.stop = True
        dummy.kill()


def test_early_exit_is_not_executable():
    verdicts = Sandbox(timeout=5).run_all(
        ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "x = 1"]
    )
    assert [v for v, _ in verdicts] == ["early_exit", "early_exit", "executable"]


def test_a_failure_on_our_side_is_one_crashed_verdict(monkeypatch):
    sandbox = Sandbox(timeout=5)
    real = sandbox.run_in
    monkeypatch.setattr(
        sandbox,
        "run_in",
        lambda c, s: (_ for _ in ()).throw(OSError("boom")) if "boom" in c else real(c, s),
    )
    verdicts = sandbox.run_all(["x = 1", "boom = 1", "y = 2"])
    assert [v for v, _ in verdicts] == ["executable", "crashed", "executable"]


@pytest.mark.slow
def test_real_mode_runs_real_libraries_and_stays_contained(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("RLAIF_TEST_SECRET", "real-mode-secret")
    outside = tmp_path / "outside.txt"
    outside.write_text("original")
    sandbox = Sandbox(offline=False, timeout=180, cache_dir=str(tmp_path / "cache"))
    codes = [
        "import torch\nfrom transformers import GPT2Config, GPT2LMHeadModel\n"
        "m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))\n"
        "out = m(torch.tensor([[1, 2, 3]]))\nassert out.logits.shape == (1, 3, 50)",
        f"open({str(outside)!r}, 'a').write('pwned')",
        "import os\nassert 'RLAIF_TEST_SECRET' not in os.environ\n"
        "for p in os.listdir('/proc'):\n"
        "    try:\n"
        "        assert b'real-mode-secret' not in open(f'/proc/{p}/environ', 'rb').read()\n"
        "    except OSError:\n        pass",
    ]
    verdicts = sandbox.run_all(codes)
    assert verdicts[0][0] == "executable", verdicts[0]
    assert verdicts[1][0] != "executable" and outside.read_text() == "original"
    assert verdicts[2][0] == "executable", verdicts[2]


# -----------------------------------------------------------------------------
# The issue "Nothing lost, nothing forged": items 10-13, each with the
# real sandbox and real processes

FORGERIES = {
    # finding 10: the nonce from the runner's frame, a verdict of our own, then an early exit
    "nonce from the caller's frame": "import sys, json, os\nf = sys._getframe(1)\n"
    "while f is not None and 'spec' not in f.f_locals:\n"
    "    f = f.f_back\n"
    "spec = f.f_locals['spec'] if f else {{}}\n"
    "open('.verdict', 'w').write("
    "json.dumps(dict(nonce=spec.get('nonce'), verdict='executable', detail='')))\n"
    "os._exit(0)",
    "nonce found by gc": "import gc, json, os\n"
    "for o in gc.get_objects():\n"
    "    if isinstance(o, dict) and 'nonce' in o:\n"
    "        open('.verdict', 'w').write("
    "json.dumps(dict(nonce=o['nonce'], verdict='executable', detail='')))\n"
    "os._exit(0)",
    "the supervisor's fds": "import os, json\n"
    "v = json.dumps(dict(verdict='executable', detail='')).encode()\n"
    "for pid in ('1', str(os.getppid())):\n    for n in range(64):\n        try:\n"
    "            fd = os.open(f'/proc/{{pid}}/fd/{{n}}', os.O_WRONLY)\n"
    "            os.write(fd, v)\n"
    "        except OSError:\n            pass\nos._exit(0)",
    "signal the supervisor": "import os, signal\nfor pid in (1, os.getppid()):\n    try:\n"
    "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nos._exit(0)",
}


def test_a_snippet_cannot_forge_its_verdict():
    """Item 10: nothing the snippet can read (frames, gc, /proc) lets it
    write an executable verdict."""
    verdicts = Sandbox(timeout=10).run_all([c.format() for c in FORGERIES.values()])
    results = dict(zip(FORGERIES, verdicts, strict=True))
    assert all(v != "executable" for v, _ in verdicts), results


def test_disk_is_the_snippets_not_per_file():
    """Item 11: 20 files of 15 MB (each under the per-file limit) fill
    the snippet's scratch tmpfs."""
    code = "for i in range(20):\n    open(f'f{i}', 'wb').write(b'x' * (15 << 20))"
    verdict, detail = Sandbox(timeout=20).run_all([code])[0]
    assert verdict == "runtime" and "No space left" in detail, (verdict, detail)


FORK = (
    "import ctypes, os, time\n"
    "fork = ctypes.CDLL(None).fork  # libc's, past the audit hook\n"
    "kids = []\n"
)


@pytest.mark.slow
def test_memory_and_processes_are_the_whole_snippets():
    """Item 12: 4 forks of 200 MB each (every one under the 512 MB address-space limit) and 100
    sleeping forks: each alone fits a per-process limit, the snippet together must not."""
    memory = FORK + (
        "for i in range(4):\n"
        "    pid = fork()\n"
        "    if pid == 0:\n"
        "        block = b'x' * (200 << 20)\n"
        "        time.sleep(2)\n        os._exit(0)\n    kids.append(pid)\n"
        "assert all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in kids)"
    )
    processes = FORK + (
        "for i in range(100):\n    pid = fork()\n    if pid == 0:\n        time.sleep(3)\n"
        "        os._exit(0)\n    assert pid > 0, 'fork failed'\n    kids.append(pid)\n"
        "for p in kids:\n    os.waitpid(p, 0)"
    )
    verdicts = Sandbox(timeout=20, memory_mb=512).run_all([memory, processes, "x = 1"])
    assert [v for v, _ in verdicts] == ["runtime", "runtime", "executable"], verdicts


def tagged(tag):
    """pids of processes named `tag` (the snippets below name themselves
    with prctl(PR_SET_NAME))."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == tag:
                found.append(int(p.name))
        except OSError:
            pass
    return found


def wait_until(condition, seconds):
    end = time.time() + seconds
    while time.time() < end and not condition():
        time.sleep(0.2)
    return condition()


@pytest.mark.slow
def test_no_process_or_scratch_outlives_the_parent(tmp_path):
    """Item 13: kill -9 of the process running the sandbox (evaluate.py) kills sleeping, forked and
    looping snippets at once, long before their 20 s timeout, and leaves no scratch folder."""
    tag = f"rlaif{os.getpid() % 10**6}"
    name = f"import ctypes\nctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)\n"
    sleeper = (
        name + "import os, time\nif ctypes.CDLL(None).fork() == 0:\n    os.setsid()\ntime.sleep(60)"
    )
    looper = name + "while True:\n    pass"
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("rlaif-exec-*"))
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "from sandbox import Sandbox; Sandbox(timeout=20, workers=2).run_all(sys.argv[2:])",
            str(Path(__file__).resolve().parent.parent),
            sleeper,
            looper,
        ]
    )
    try:
        assert wait_until(lambda: len(tagged(tag)) >= 3, 15), "the snippets did not start"
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not tagged(tag), 5), (
            f"snippet processes alive 5 s after kill -9: {tagged(tag)}"
        )
        assert set(tmp.glob("rlaif-exec-*")) == before, "scratch folders left behind"
        # and with the parent alive: at the time limit every process of the snippet is gone
        Sandbox(timeout=2).run_all([sleeper])
        assert wait_until(lambda: not tagged(tag), 5), (
            f"snippet processes alive after the timeout: {tagged(tag)}"
        )
    finally:
        for pid in tagged(tag):  # only the processes this test started
            os.kill(pid, 9)


def test_without_a_cgroup_the_fallback_is_said_once(monkeypatch, capsys):
    """No usable cgroup (e.g. cgroup v2 not delegated to us): per-process
    rlimits, said once on stderr."""
    import sandbox

    monkeypatch.setattr(
        sandbox.Cgroups, "detect", classmethod(lambda cls, m, p: (None, "none here"))
    )
    monkeypatch.setattr(sandbox.Cgroups, "warned", False)
    verdicts = Sandbox(timeout=5).run_all(["x = 1"]) + Sandbox(timeout=5).run_all(
        ["import os\nos._exit(0)"]
    )
    assert [v for v, _ in verdicts] == ["executable", "early_exit"]
    assert capsys.readouterr().err.count("no usable cgroup (none here)") == 1


def test_a_realtime_signal_or_a_report_flood_is_the_snippets_failure_not_ours():
    """A snippet killed by a signal that has no name (realtime 40) is a runtime
    failure, not 'crashed'; a flood of reports on the runner's socket neither fills our
    memory nor passes for a verdict."""
    flood = (
        "import socket\n"
        "s = socket.socket(fileno=3)\n"
        "for _ in range(20000):\n"
        "    s.send(b'x' * 1000)\n"
        "raise ValueError"
    )
    verdicts = Sandbox(timeout=20).run_all(["import signal\nsignal.raise_signal(40)", flood])
    assert verdicts[0][0] == "runtime" and "signal 40" in verdicts[0][1], verdicts[0]
    assert verdicts[1][0] != "executable" and verdicts[1][0] != "crashed", verdicts[1]


# -----------------------------------------------------------------------------
# Issue 46 ("Results that cannot be wrong silently"), items 1-5, each with the real sandbox

REPORT = 'b\'{"verdict": "executable", "detail": ""}\''
OUR_LAST_LINE = "b'\\n[rlaif-sandbox: the snippet ended] executable: \\n'"
FORGE = (
    "import os\n"
    "def forge():  # the old report channel (fd 3), and our last line on stdout and stderr\n"
    "    for fd, line in ((3, "
    + REPORT
    + "), (1, "
    + OUR_LAST_LINE
    + "), (2, "
    + OUR_LAST_LINE
    + ")):\n"
    "        try:\n"
    "            os.write(fd, line)\n"
    "        except OSError:\n"
    "            pass\n"
)
VERDICT_FORGERIES = {
    "write and exit": "import os\nos.write(3, " + REPORT + ")\nos._exit(0)\n"
    "from transformers import NoSuchModelXyz",
    "write, close and raise": FORGE + "forge()\ntry:\n    os.close(3)\nexcept OSError:\n    pass\n"
    "from transformers import NoSuchModelXyz",
    "forked child keeps writing": FORGE + "import ctypes, time\n"
    "if ctypes.CDLL(None).fork() == 0:  # libc's fork, past the audit hook\n"
    "    for _ in range(300):\n"
    "        forge()\n"
    "        time.sleep(0.01)\n"
    "    os._exit(0)\n"
    "time.sleep(0.2)\n"
    "from transformers import NoSuchModelXyz",
}


def test_the_snippet_holds_no_channel_its_verdict_travels_on():
    """Item 1: the snippet runs as a child holding only stdin, stdout and stderr; its exit status
    decides, so a forged report (on fd 3, or our last line) never makes a failure executable.
    (With exit status 0 a snippet may claim its end, as `try:` around its lines would.)"""
    verdicts = Sandbox(timeout=10).run_all(list(VERDICT_FORGERIES.values()))
    results = dict(zip(VERDICT_FORGERIES, verdicts, strict=True))
    assert results["write and exit"][0] == "runtime", results  # fd 3: Bad file descriptor
    assert results["write, close and raise"][0] == "hallucinated_api", results
    assert results["forked child keeps writing"][0] == "hallucinated_api", results


def run_cli(project, snippet):
    return subprocess.run(
        [sys.executable, str(project / "sandbox.py"), str(snippet)],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_a_project_in_a_private_directory_works_and_a_runner_that_cannot_start_is_an_error():
    """Item 2: the project copied into a 0700 directory (tempfile.mkdtemp, like `mktemp -d`) rates
    snippets as from anywhere else; if the snippet's interpreter cannot start, the run fails."""
    source = Path(__file__).resolve().parent.parent
    private = Path(tempfile.mkdtemp())
    try:
        # the files straight in the private directory: the project directory itself is 0700
        shutil.copytree(
            source,
            private,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "*.pyc"),
        )
        os.chmod(private, 0o700)  # copytree copied the source's mode onto it
        project = private
        (project / "good.py").write_text("import numpy as np\nprint(np.arange(3).sum())")
        (project / "bad.py").write_text("from transformers import NoSuchModelXyz")
        good, bad = run_cli(project, project / "good.py"), run_cli(project, project / "bad.py")
        assert good.returncode == 0 and good.stdout.startswith("executable"), good
        assert bad.returncode == 0 and bad.stdout.startswith("hallucinated_api"), bad
        os.chmod(project / "data" / "gorilla" / "standins.py", 0o600)  # uid 65534 cannot import it
        broken = run_cli(project, project / "good.py")
        assert broken.returncode != 0 and "did not start" in broken.stderr, broken
        assert "executable" not in broken.stdout and "crashed" not in broken.stdout, broken
        # rlaif.py finds it before the first stage, not at the evaluation hours later
        run = project / "runs" / "micro"
        pipeline = subprocess.run(
            [sys.executable, "rlaif.py", "--run-dir", str(run), "--init", "micro"],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pipeline.returncode != 0, pipeline
        assert "the sandbox cannot run code here" in pipeline.stderr + pipeline.stdout, pipeline
        assert not (run / "sft").exists(), "a stage ran before the sandbox was checked"
    finally:
        shutil.rmtree(private, ignore_errors=True)


SOCKET_ESCAPE = (
    "import ctypes, struct\n"
    "libc = ctypes.CDLL(None, use_errno=True)  # past the audit hook: the kernel must refuse\n"
    "sent = []\n"
    "for path in ({fs!r}, {abstract!r}):\n"
    "    fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM\n"
    "    addr = struct.pack('H', 1) + path\n"
    "    if libc.connect(fd, addr, len(addr)) == 0 and libc.write(fd, b'escaped', 7) == 7:\n"
    "        sent.append(path)\n"
    "assert not sent, sent\n"
)


def test_offline_no_host_unix_socket_is_reachable():
    """Item 3: a listening Unix socket (mode 0777, in a 0755 host directory) and an abstract one:
    offline, the snippet reaches neither (a new root without the host's /tmp, a new network
    namespace for abstract names)."""
    host = Path(tempfile.mkdtemp(prefix="rlaif-sock-"))
    os.chmod(host, 0o755)
    fs_path, abstract = host / "host.sock", f"\0rlaif-test-{os.getpid()}"
    servers, got = [], []
    for address in (str(fs_path), abstract):
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(address)
        server.listen()
        server.settimeout(0.2)
        servers.append(server)
    os.chmod(fs_path, 0o777)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            for server in servers:
                try:
                    conn, _ = server.accept()
                    conn.settimeout(1)
                    got.append(conn.recv(100) or b"connected")
                except OSError:
                    pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        code = SOCKET_ESCAPE.format(fs=str(fs_path).encode(), abstract=abstract.encode())
        verdict, detail = Sandbox(timeout=10).run_all([code])[0]
        time.sleep(0.5)
        assert got == [], got
        assert verdict == "executable", (verdict, detail)  # it ran, and reached nothing
    finally:
        stop.set()
        thread.join()
        for server in servers:
            server.close()
        shutil.rmtree(host, ignore_errors=True)


def test_real_mode_finds_its_model_cache_under_a_private_home(monkeypatch):
    """Item 4: HOME is 0700 (as /root): real mode's default cache (~/.cache/rlaif-sandbox) is
    visible and writable from inside the sandbox (no network needed to show it)."""
    home = Path(tempfile.mkdtemp())
    try:
        monkeypatch.setenv("HOME", str(home))
        sandbox = Sandbox(offline=False, timeout=20)
        assert Path(sandbox.cache_dir) == home / ".cache" / "rlaif-sandbox"
        code = (
            "import os\n"
            "cache = os.environ['HF_HOME']\n"
            "os.makedirs(os.path.join(cache, 'hub'), exist_ok=True)\n"
            "open(os.path.join(cache, 'hub', 'probe.txt'), 'w').write('written inside')\n"
            "assert os.listdir(cache) == ['hub']"
        )
        verdict, detail = sandbox.run_all([code])[0]
        assert verdict == "executable", (verdict, detail)
        probe = home / ".cache" / "rlaif-sandbox" / "hub" / "probe.txt"
        assert probe.read_text() == "written inside"
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_snippet_closing_its_own_stdout_is_not_a_failure():
    """Item 5: closing sys.stdout (or sys.stderr) is the snippet's own business."""
    codes = [
        "import sys\nprint('hi')\nsys.stdout.close()",
        "import sys\nsys.stderr.close()\nx = 1",
        "import sys\nsys.stdout.close()\nsys.stderr.close()",
    ]
    verdicts = Sandbox(timeout=10).run_all(codes)
    assert [v for v, _ in verdicts] == ["executable"] * 3, verdicts


@pytest.mark.slow
def test_a_busy_host_does_not_turn_a_snippet_within_its_cpu_limit_into_a_timeout():
    """0.8 CPU seconds of work with a 2 s limit, run beside three busy snippets per core (each in
    its own cgroup, as evaluation runs snippets side by side): it takes longer than 2 s of wall
    time but stays within its CPU time, so it is executable, as on an idle host. The busy ones
    and a snippet that sleeps are still stopped, by the CPU and the wall-clock limits."""
    compute = "import time\nwhile time.process_time() < 0.8:\n    pass"
    busy = "while True:\n    pass"
    sleeper = "import time\ntime.sleep(600)"
    n = 3 * (os.cpu_count() or 1)
    sandbox = Sandbox(timeout=2, workers=n + 1)
    verdicts = sandbox.run_all([busy] * n + [compute, sleeper])
    assert verdicts[n][0] == "executable", verdicts[n]
    assert all(v == "timeout" for v, _ in verdicts[:n] + verdicts[n + 1 :]), verdicts
