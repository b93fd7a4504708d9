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
  offline: no weights or network exist, so the model libraries (standins.STUBBED) are replaced by the
           stand-ins of data/gorilla/standins.py that check what the code asks of them [offline stand-in], against data/gorilla/api_names.json
           (transformers 4.57.6): names a library does not have, calls that do not fit the real
           signature, unknown pipeline tasks and models a task cannot run, model ids not in the API
           database. Missing input files and names the code marks as the user's are placeholders.
           Everything else (Python, the standard library, numpy) really runs (docs/metrics.md).
A snippet is executable only if it runs to its end: the child writes its verdict after the snippet
returns, so `os._exit(0)` or `sys.exit(0)` halfway is not executable.
"""
import argparse
import builtins
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.gorilla import standins
from data.gorilla.apis import APIDatabase

ROOT = Path(__file__).resolve().parent
NOBODY = 65534
VERDICT_FILE = ".verdict"
# Verdicts: "executable" or the class of failure.
VERDICTS = ("executable", "syntax", "import", "hallucinated_api", "runtime", "blocked", "early_exit",
            "timeout", "no_code", "crashed")


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
    if isinstance(exc, standins.HallucinatedAPI):
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
            scope.update(standins.install(spec))
            sys.addaudithook(name_blocked)
        try:
            exec(compiled, scope)
        except BaseException as e:  # SystemExit too: only code that reaches its end is executable
            verdict, detail = verdict_of(e), f"{type(e).__name__}: {e}"
    if verdict == "executable" and standins.Checks.placeholders:
        detail = "placeholder inputs: " + ", ".join(sorted(set(map(str, standins.Checks.placeholders))))
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
