"""
Running code a model wrote, for the executability rate (Dutta et al. 2024, section 4).

    python sandbox.py --check              # is OS-level isolation available here?
    python sandbox.py FILE.py [--real]     # one snippet's verdict

Generated code is hostile until proven otherwise, so each snippet runs in fresh processes that the
operating system isolates (not Python: an audit hook can be switched off from inside, PEP 578):
  - namespaces (util-linux `unshare`): mount, PID, IPC, UTS, and in offline mode network, so the
    snippet sees only its own processes and a fresh /proc, and offline it has no network interface;
  - a new root (pivot_root): the system directories, and at their own paths the project, the
    interpreter and (real mode) the model cache; not the host's /tmp, /run or /home, so no host
    Unix socket; every mount read-only except the snippet's scratch directory, a size-limited
    tmpfs mounted in its own mount namespace (it vanishes with the namespace: nothing is left on
    disk), and in real mode a model cache whose growth a watchdog bounds;
  - an unprivileged uid (65534 via `setpriv` when we are root; otherwise a user namespace with every
    capability dropped), no new privileges, a scrubbed environment;
  - a cgroup per snippet (v1 memory + pids, or v2 memory.max + pids.max) bounds the memory and the
    number of processes of all its processes together; rlimits bound CPU time, file size and open
    files per process. Without a usable cgroup, memory and processes fall back to per-process
    rlimits (said once on stderr; docs/reliability.md);
  - no process outlives its snippet: the namespace's first process is the supervisor below; when it
    exits, or our process dies (parent-death signal and a lifeline pipe), the kernel kills every
    process in the namespace, and the cgroup is emptied with SIGKILL before it is removed.
Why `unshare` + `setpriv`: both ship with util-linux, already on every Linux machine we target,
where bubblewrap or nsjail would be one more system package to install.

Who decides the verdict. Anything inside the snippet's process is readable and writable by it (its
frames, `gc`, its file descriptors), so no verdict travels through it. Inside the namespace a
supervisor (first process, the namespace's root, not dumpable: the snippet can neither read its
memory nor signal it) starts the snippet's interpreter as its child, which drops to uid 65534 and
holds nothing of ours: stdin is /dev/null, stdout and stderr one pipe that only the supervisor
reads. The verdict is what the kernel says of that child: the time limit, a signal, its exit
status. 0 is executable, every other status a failure (the interpreter exits with a status per
class: import, hallucinated_api, ...); the output only names the detail, and for status 0 carries
the line our interpreter writes after the snippet's last line (`os._exit(0)` halfway: early_exit).
A snippet can write anything there, so no output turns a nonzero status or a signal into
"executable"; a snippet that catches its own errors and exits 0 is executable (docs/metrics.md).
If the interpreter never starts (our side), that is an error (SandboxError), never a verdict.

Two modes, one code path:
  real:    the snippet runs with the real libraries and network (downloads allowed), as a
  user would. offline: no weights or network exist, so the model libraries
  (standins.STUBBED) are replaced by the
           stand-ins of data/gorilla/standins.py that check what the code asks of them [offline
           stand-in], against data/gorilla/api_names.json (transformers 4.57.6): names a library
           does not have, calls that do not fit the real signature, unknown pipeline tasks and
           models a task cannot run, model ids not in the API database. Missing input files and
           names the code marks as the user's are placeholders. Everything else (Python, the
           standard library, numpy) really runs (docs/metrics.md).
"""

import argparse
import builtins
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.gorilla import standins
from data.gorilla.apis import APIDatabase

ROOT = Path(__file__).resolve().parent
NOBODY = 65534
# Verdicts: "executable" or the class of failure. The runner can only report the first seven.
VERDICTS = (
    "executable",
    "syntax",
    "import",
    "hallucinated_api",
    "runtime",
    "blocked",
    "early_exit",
    "timeout",
    "no_code",
    "crashed",
)
# The exit status of the snippet's interpreter for each way a snippet ends: the kernel reports it
# to the supervisor, and 0 is the only executable one (any other status is a failure).
EXIT_STATUS = {
    "executable": 0,
    "syntax": 10,
    "import": 11,
    "hallucinated_api": 12,
    "runtime": 13,
    "blocked": 14,
    "early_exit": 15,
}
STATUS_VERDICT = {status: verdict for verdict, status in EXIT_STATUS.items()}
START = b"[rlaif-sandbox: the snippet starts]\n"  # written before the snippet's first line runs
HEAD = 4096  # bytes of output in which START must be (our imports may warn before it)
END = "[rlaif-sandbox: the snippet ended] "  # our last line: END + "verdict: detail"
SPEC_FILE = ".spec.json"  # what the runner needs (code, offline API tables); holds no secret
GRACE = 10.0  # seconds we wait beyond the wall-clock limit for the supervisor to say "timeout"
# A snippet that computes is stopped by its CPU time (RLIMIT_CPU, the timeout); the wall clock,
# which stops one that waits (sleep, input, a download), allows WALL_FACTOR times as long, so that
# a busy host does not turn a snippet that computes for a few seconds into a timeout: on a host
# running two seeds and the tests, a validation answer went from executable to timeout at 1x.
WALL_FACTOR = 3
# The scratch tmpfs is mounted here inside each snippet's own mount namespace; on the host it is one
# permanent, always empty directory (namespaces are private, so snippets never see each other's).
SCRATCH = Path(tempfile.gettempdir()) / f"rlaif-sandbox-{os.geteuid()}"
NEWROOT = Path(tempfile.gettempdir()) / f"rlaif-sandbox-{os.geteuid()}-root"  # likewise: the root
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded now: dlopen between fork and exec could deadlock
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4


class SandboxError(RuntimeError):
    """The sandbox itself failed (the snippet's interpreter could not start): no snippet's
    verdict, so evaluation stops instead of rating every snippet a failure."""


# -----------------------------------------------------------------------------
# The runner (uid 65534, its own process): runs one snippet, then reports how it ended

BLOCKED_EVENTS = (
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "pty.spawn",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "socket.connect",
    "socket.bind",
    "socket.getaddrinfo",
    "socket.sendto",
    "socket.sendmsg",
)


def name_blocked(event, args):
    """Offline only, and only to *name* a verdict ("blocked"): what a model-library snippet has no
    need to do. Containment does not rest on this hook; the operating system provides it."""
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


def run_snippet(spec):
    """(verdict, detail) of running spec["code"] in this process."""
    try:
        compiled = compile(spec["code"], "<answer>", "exec")
    except (SyntaxError, ValueError) as e:
        return "syntax", str(e)
    scope = {"__name__": "__main__", "__builtins__": builtins}
    if spec["offline"]:
        scope.update(standins.install(spec))
        sys.addaudithook(name_blocked)
    try:
        exec(compiled, scope)
    except BaseException as e:  # SystemExit too: only code that reaches its end is executable
        try:
            return verdict_of(e), f"{type(e).__name__}: {e}"
        except BaseException:  # an exception whose str() fails is still its class
            return verdict_of(e), type(e).__name__
    if standins.Checks.placeholders:
        return "executable", "placeholder inputs: " + ", ".join(
            sorted(set(map(str, standins.Checks.placeholders)))
        )
    return "executable", ""


def runner_main():
    """The snippet's interpreter (uid 65534, a child of the supervisor holding only stdin, stdout
    and stderr): runs the snippet, ends with its verdict's exit status. Everything in this process
    is the snippet's to change, so the supervisor believes of it only what the exit status allows: a
    nonzero status (or a signal) is never executable, whatever was written."""
    write, exit_ = os.write, os._exit  # bound before the snippet can replace them
    spec = json.loads(Path(SPEC_FILE).read_text())
    os.remove(SPEC_FILE)
    write(1, START)  # before the snippet's first line: output without it means *we* failed
    verdict, detail = run_snippet(spec)
    for stream in (sys.stdout, sys.stderr):  # closed or replaced by the snippet: not its failure
        try:
            stream.flush()
        except BaseException:
            pass
    line = f"\n{END}{verdict}: {detail[:500]}\n".encode(errors="replace")
    for fd in (2, 1):  # either reaches the supervisor, unless the snippet closed both
        try:
            write(fd, line)
        except OSError:
            pass
    exit_(EXIT_STATUS.get(verdict, EXIT_STATUS["runtime"]))


# -----------------------------------------------------------------------------
# The supervisor: the namespace's first process; starts the runner, judges it, tells us


def supervisor_main(verdict_fd, lifeline_fd, job_fd):
    """Not dumpable, so the runner (another uid, or no capabilities) cannot read our memory or fds.
    Our exit, as the PID namespace's first process, makes the kernel kill everything left in it."""
    LIBC.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    with os.fdopen(job_fd) as f:
        job = json.load(f)
    try:
        result = supervise(job, lifeline_fd)
    except Exception as e:  # our side: one crashed verdict
        result = dict(verdict="crashed", detail=f"supervisor: {type(e).__name__}: {e}")
    with os.fdopen(verdict_fd, "w") as out:
        out.write(json.dumps(result))
    os._exit(0)


def supervise(job, lifeline):
    Path(SPEC_FILE).write_text(json.dumps(job["spec"]))
    if job["chown"]:
        os.chown(SPEC_FILE, NOBODY, NOBODY)
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        start_runner(job["runner"], out_w)
    os.close(out_w)
    return judge(*watch(job, pid, out_r, lifeline))


def start_runner(argv, out_fd):
    """In the forked child: the snippet's interpreter gets /dev/null, the output pipe, nothing
    else (no descriptor of ours that a verdict could travel on)."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)


def watch(job, pid, out_r, lifeline):
    """Wait for the snippet's interpreter, keeping the head and the tail of its output; (status,
    head, tail), status None at the wall-clock limit. Our host's death (lifeline at EOF) ends us,
    hence the namespace."""
    deadline, next_disk = time.monotonic() + job["wall_seconds"], 0.0
    cache_start = dir_size(job["cache_dir"]) if job["cache_dir"] else 0
    head, tail, status, open_fds = b"", b"", None, [out_r, lifeline]
    os.set_blocking(out_r, False)
    while status is None and time.monotonic() < deadline:
        ready = select.select(open_fds, [], [], 0.05)[0]
        if lifeline in ready:
            os._exit(1)
        if out_r in ready:
            chunk = read_some(out_r)
            head = (head + chunk)[:HEAD]
            tail = (tail + chunk)[-job["max_output"] :]
            if not chunk:
                open_fds.remove(out_r)
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        status = wait_status if done else None
        if job["cache_dir"] and time.monotonic() > next_disk:  # real mode: the shared model cache
            next_disk = time.monotonic() + 1.0
            if dir_size(job["cache_dir"]) - cache_start > job["cache_mb"] << 20:
                return "disk", head, tail
    for _ in range(64):  # what was written just before the exit (a forked child may go on)
        chunk = read_some(out_r)
        if not chunk:
            break
        head = (head + chunk)[:HEAD]
        tail = (tail + chunk)[-job["max_output"] :]
    return (status if status is not None else "timeout"), head, tail


def read_some(fd):
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def dir_size(path, max_entries=200_000):
    """Bytes under `path` (allocated blocks); a tree of more than max_entries counts as infinite."""
    total, seen = 0, 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            seen += 1
            if seen > max_entries:
                return float("inf")
            try:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
            except OSError:
                pass
    return total


SIGNAL_NAMES = {int(sig) for sig in signal.Signals}  # realtime signals have numbers but no name


def judge(status, head, tail):
    """The verdict from what the kernel says of the snippet's interpreter (time limit, signal, exit
    status); its output only names the failure and gives the detail, and says "reached the end"
    when the status is 0. A snippet can write anything there, so nothing written makes a nonzero
    status or a signal executable."""
    lines = [line for line in tail.decode(errors="replace").split("\n") if line.strip()]
    ours = [line[len(END) :] for line in lines if line.startswith(END)]
    theirs = [line for line in lines if not line.startswith(END) and line != START.decode()[:-1]]
    last = theirs[-1][:300] if theirs else ""
    if status == "timeout":
        return dict(verdict="timeout", detail="killed at the wall-clock limit")
    if status == "disk":
        return dict(verdict="runtime", detail="killed: over the disk limit of the model cache")
    if START not in head:  # no snippet code ran: the failure is ours, not the snippet's
        return dict(error=f"the snippet's interpreter did not start: {last or status}")
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number == signal.SIGXCPU:
            return dict(verdict="timeout", detail="killed at the CPU time limit")
        name = signal.Signals(number).name if number in SIGNAL_NAMES else f"signal {number}"
        return dict(verdict="runtime", detail=f"killed by {name} ({last or 'no output'})")
    code = os.WEXITSTATUS(status)
    verdict = "executable" if code == 0 else STATUS_VERDICT.get(code, "early_exit")
    said = [line.split(": ", 1) for line in ours if line.split(": ", 1)[0] == verdict]
    if code == 0 and not said:  # os._exit(0) halfway: our last line never came
        return dict(verdict="early_exit", detail=f"ended before its last line, exit 0 ({last})")
    if said:
        return dict(verdict=verdict, detail=said[-1][-1][:500] if len(said[-1]) > 1 else "")
    return dict(verdict=verdict, detail=f"exit status {code} ({last})")


# -----------------------------------------------------------------------------
# The isolation: namespaces, read-only mounts, a tmpfs scratch directory, an unprivileged uid

# Runs as (namespace-)root inside the new mount namespace, then becomes the supervisor. $@: the
# directories that stay writable besides the scratch tmpfs (real mode: the model cache).
# The snippet gets a new root, a small tmpfs: the system's program directories (/usr, /etc, ...),
# a few devices, and at their own paths only what it needs ($BINDS: the project, the interpreter,
# the model cache). The host's writable tree (/tmp, /run, /home, ... with their Unix sockets) is not
# in it, and intermediate directories are the tmpfs's (0755), so a project or a HOME in a 0700
# directory is readable by uid 65534 without opening that directory on the host.
MOUNT_SCRIPT = r"""
set -e
mount --make-rprivate /
R="$NEWROOT"
mount -t tmpfs -o size=1m,mode=0755 rlaif-root "$R"
for d in usr etc opt bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"
  elif [ -d "/$d" ]; then mkdir "$R/$d"; mount --rbind "/$d" "$R/$d"; fi
done
mkdir -p "$R/dev" "$R/proc" "$R/sys" "$R/tmp" "$R$SCRATCH"
for n in null zero full random urandom; do
  touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
mount --rbind /sys "$R/sys"
printf '%s\n' "$BINDS" | while read -r kind path; do
  case "$kind" in
    dir) mkdir -p "$R$path"; mount --bind "$path" "$R$path" ;;
    file) mkdir -p "$(dirname "$R$path")"; touch "$R$path"; mount --bind "$path" "$R$path" ;;
    link) mkdir -p "$(dirname "$R$path")"; ln -sfn "$(readlink "$path")" "$R$path" ;;
  esac
done
mount -t tmpfs -o "$TMPFS_OPTIONS" rlaif-scratch "$R$SCRATCH"
mount -t proc proc "$R/proc"
mkdir "$R/.old-root"
cd "$R"
PATH="/usr/sbin:/sbin:$PATH" pivot_root . .old-root
umount -l /.old-root
rmdir /.old-root
awk '{print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
  keep=0; for w in "$SCRATCH" "$@"; do [ "$m" = "$w" ] && keep=1; done
  [ "$keep" = 1 ] || mount -o remount,bind,ro "$m" 2>/dev/null \
    || [ "$m" = /proc ] || [ "${m#/proc/}" != "$m" ] \
    || { echo "sandbox: cannot make $m read-only" >&2; exit 97; }
done
cd "$SCRATCH"  # the tmpfs, not the empty directory under it
exec "$PYTHON" -I -c "$CHILD"
"""
# In the new root already (MOUNT_SCRIPT): a path under one of these needs no bind of its own.
SYSTEM_DIRS = ("/usr", "/etc", "/opt", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def needed_paths(writable):
    """What the snippet's interpreter needs besides the system directories: the project (its
    stand-ins), the interpreter (venv and base installation), the writable model cache."""
    paths = [ROOT, sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *writable]
    paths.append(os.path.dirname(os.path.realpath(sys.executable)))
    paths.append(os.path.realpath("/etc/resolv.conf"))  # real mode: a link into /run is common
    kept = []
    for p in map(os.path.abspath, map(str, paths)):
        if os.path.exists(p) and p not in kept and not p.startswith(SYSTEM_DIRS + ("/dev",)):
            kept.append(p)
    return [p for p in kept if not any(p.startswith(q + "/") for q in kept)]


def bind_lines(paths):
    """MOUNT_SCRIPT's $BINDS: "dir PATH", "file PATH" or "link PATH" lines. A directory others
    cannot read and enter (a project copied into `mktemp -d`) keeps its mode when bound, so its
    entries are bound one by one into the tmpfs's 0755 directory instead."""
    lines = []
    for p in paths:
        if "\n" in p:
            raise SandboxError(f"sandbox: a path with a newline cannot be bound: {p!r}")
        entries = [p]
        if os.path.isdir(p) and os.stat(p).st_mode & 0o005 != 0o005:
            entries = [os.path.join(p, e) for e in sorted(os.listdir(p))]
        for e in entries:
            kind = "link" if os.path.islink(e) else "dir" if os.path.isdir(e) else "file"
            lines.append(f"{kind} {e}")
    return "\n".join(lines)


def isolation_available():
    """None if the namespaces and tools work here, else the reason they do not."""
    for tool in ("unshare", "setpriv", "mount", "pivot_root"):
        if shutil.which(tool, path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) is None:
            return f"`{tool}` (util-linux) is not installed"
    probe = subprocess.run(
        namespace_command(offline=True) + ["true"], capture_output=True, text=True
    )
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


def isolated_command(writable, offline, child_code, disk_mb):
    """argv that runs `child_code` isolated, with a `disk_mb` tmpfs as its working directory and
    only `writable` directories writable besides."""
    owner = f",uid={NOBODY},gid={NOBODY}" if os.geteuid() == 0 else ""
    tmpfs = f"size={disk_mb}m,nr_inodes=65536,mode=0700,nosuid,nodev{owner}"
    env_setup = [
        "env",
        f"TMPFS_OPTIONS={tmpfs}",
        f"SCRATCH={SCRATCH}",
        f"NEWROOT={NEWROOT}",
        f"BINDS={bind_lines(needed_paths(writable))}",
        f"PYTHON={sys.executable}",
        f"CHILD={child_code}",
    ]
    return namespace_command(offline) + env_setup + ["sh", "-c", MOUNT_SCRIPT, "sandbox", *writable]


def scratch_mountpoint():
    """The host side of the scratch directory and of the new root: ours, real directories
    (not links someone planted)."""
    for d in (SCRATCH, NEWROOT):
        d.mkdir(mode=0o755, exist_ok=True)
        st = os.lstat(d)
        if not os.path.isdir(d) or os.path.islink(d) or st.st_uid != os.geteuid():
            raise RuntimeError(f"sandbox: {d} is not a directory of ours")
    return SCRATCH


# -----------------------------------------------------------------------------
# Cgroups: memory and process count of all a snippet's processes together


def cgroup_mounts():
    """{"memory": (mount point, our group), "pids": ..., "v2": ...} from
    /proc/self/{mountinfo,cgroup}."""
    ours = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["v2"]:
            ours[c] = path
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, after = line.split(" - ", 1)
        fields, (fstype, _, options) = fields.split(), after.split()[:3]
        root, point = fields[3], fields[4]
        keys = (
            ["v2"]
            if fstype == "cgroup2"
            else [c for c in ("memory", "pids") if fstype == "cgroup" and c in options.split(",")]
        )
        for key in keys:
            if key in ours:  # our group, relative to what this mount shows
                rel = (
                    ours[key][len(root) :]
                    if ours[key].startswith(root) and root != "/"
                    else ours[key]
                )
                found[key] = (Path(point), Path(point) / rel.lstrip("/"))
    return found


class Cgroup:
    """One snippet's cgroup (one directory per v1 controller, or one v2 directory)."""

    def __init__(self, dirs, v2):
        self.dirs, self.v2 = dirs, v2

    def join(self):
        """Called between fork and exec: this process and all it starts belong to the snippet."""
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self):
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            fields = dict(line.split() for line in (self.dirs[0] / name).read_text().splitlines())
        except (OSError, ValueError):
            return False
        return int(fields.get("oom_kill", 0)) > 0 or (not self.v2 and self.failcnt() > 0)

    def failcnt(self):
        try:
            return int((self.dirs[0] / "memory.failcnt").read_text())
        except (OSError, ValueError):
            return 0

    def kill(self):
        """SIGKILL every process in it until it is empty (a process forking
        meanwhile is caught next round)."""
        if self.v2 and (self.dirs[0] / "cgroup.kill").exists():
            (self.dirs[0] / "cgroup.kill").write_text("1")
        for _ in range(200):
            pids = [int(p) for d in self.dirs for p in read_or_empty(d / "cgroup.procs").split()]
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self):
        self.kill()
        for d in self.dirs:
            for _ in range(100):  # a killed process leaves its group a moment later
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def read_or_empty(path):
    try:
        return path.read_text()
    except OSError:
        return ""


class Cgroups:
    """Makes one cgroup per snippet under our own group (so whatever limits us still limits them):
    cgroup v1 memory + pids controllers, else a v2 group with both controllers delegated to us."""

    counter = 0
    lock = threading.Lock()
    warned = False

    def __init__(self, parents, v2, memory_mb, max_procs):
        self.parents, self.v2, self.memory_mb, self.max_procs = parents, v2, memory_mb, max_procs

    @classmethod
    def detect(cls, memory_mb, max_procs):
        """(Cgroups, None) or (None, the reason there are none)."""
        try:
            mounts = cgroup_mounts()
            if "memory" in mounts and "pids" in mounts:
                parents = [make_dir(mounts[c][1] / "rlaif-sandbox") for c in ("memory", "pids")]
                v2 = False
            elif "v2" in mounts:
                parents, v2 = [v2_parent(*mounts["v2"])], True
            else:
                return None, "no cgroup v1 memory+pids controllers and no cgroup v2 mounted"
            groups = cls(parents, v2, memory_mb, max_procs)
            groups.remove_stale()
            groups.create().remove()  # a trial: permissions, controllers
            return groups, None
        except (OSError, RuntimeError) as e:
            return None, f"{type(e).__name__}: {e}"

    def create(self):
        with Cgroups.lock:
            Cgroups.counter += 1
            name = f"snippet-{os.getpid()}-{Cgroups.counter}"
        dirs = [make_dir(p / name) for p in self.parents]
        group = Cgroup(dirs, self.v2)
        limit = str(self.memory_mb << 20)
        if self.v2:
            (dirs[0] / "memory.max").write_text(limit)
            write_if_exists(dirs[0] / "memory.swap.max", "0")
            (dirs[0] / "pids.max").write_text(str(self.max_procs))
        else:
            (dirs[0] / "memory.limit_in_bytes").write_text(limit)
            write_if_exists(dirs[0] / "memory.memsw.limit_in_bytes", limit)  # no swapping past it
            (dirs[1] / "pids.max").write_text(str(self.max_procs))
        return group

    def remove_stale(self):
        """Groups left by a process of ours that died (kill -9): empty them, remove them."""
        for parent in self.parents:
            for d in parent.glob("snippet-*-*"):
                pid = int(d.name.split("-")[1])
                if pid != os.getpid() and not pid_alive(pid):
                    Cgroup([d], self.v2).remove()


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def make_dir(path):
    path.mkdir(exist_ok=True)
    return path


def write_if_exists(path, value):
    if path.exists():
        try:
            path.write_text(value)
        except OSError:
            pass


def v2_parent(mount, own):
    """A v2 group under ours whose children may get memory and pids limits. cgroup v2 lets only a
    group without processes (or the root) give controllers to its children, so if ours has
    processes we move this one into a leaf beside them first (what systemd's Delegate= expects)."""
    if not {"memory", "pids"} <= set((own / "cgroup.controllers").read_text().split()):
        raise RuntimeError(f"the memory and pids controllers are not delegated to {own}")
    try:
        (own / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError:
        if own == mount:
            raise
        (make_dir(own / "rlaif-host") / "cgroup.procs").write_text(str(os.getpid()))
        (own / "cgroup.subtree_control").write_text("+memory +pids")
    parent = make_dir(own / "rlaif-sandbox")
    (parent / "cgroup.subtree_control").write_text("+memory +pids")
    return parent


def warn_once(message):
    if not Cgroups.warned:
        Cgroups.warned = True
        print(message, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Running one snippet, and many


@dataclass
class Sandbox:
    offline: bool = True
    timeout: float = 10.0  # CPU seconds per snippet; the wall clock: WALL_FACTOR x (downloads too)
    memory_mb: int = 0  # memory of all the snippet's processes (0: 2 GiB offline, 16 GiB real)
    disk_mb: int = 0  # its scratch tmpfs (0: 256 MiB offline, 4 GiB real; also counts as memory)
    max_procs: int = 0  # processes and threads of the snippet (0: 64 offline, 512 real)
    cache_mb: int = 32768  # real mode: how much the model cache may grow while a snippet runs
    max_output: int = 64 * 1024  # bytes of output kept (its last line is a failure's detail)
    workers: int = max(1, os.cpu_count() or 1)
    cache_dir: str = ""  # real mode: the writable model cache (default ~/.cache/rlaif-sandbox)
    unsafe: bool = False  # offline only: run without OS isolation when it is unavailable

    @property
    def wall_seconds(self):
        return WALL_FACTOR * self.timeout

    def __post_init__(self):
        self.memory_mb = self.memory_mb or (2048 if self.offline else 16384)
        self.disk_mb = self.disk_mb or (256 if self.offline else 4096)
        self.max_procs = self.max_procs or (64 if self.offline else 512)
        reason = isolation_available()
        if reason and (not self.offline or not self.unsafe):
            raise RuntimeError(
                f"sandbox: OS-level isolation is unavailable ({reason}). Generated code is not "
                "run without it. Offline mode can be forced with --unsafe-exec (NOT isolated)."
            )
        self.isolated = reason is None
        if self.isolated:
            scratch_mountpoint()
        self.cgroups, why = Cgroups.detect(self.memory_mb, self.max_procs)
        if self.cgroups is None:
            warn_once(
                f"sandbox: no usable cgroup ({why}); memory and processes are limited per process "
                "(rlimits), not per snippet (docs/reliability.md)"
            )
        if not self.offline:
            self.cache_dir = self.cache_dir or str(Path.home() / ".cache" / "rlaif-sandbox")
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(self.cache_dir, NOBODY, NOBODY)

    def launcher_setup(self, cgroup, parent):
        """Between fork and exec of the namespace's launcher (`unshare`): our death kills it (and it
        kills the namespace); it joins the snippet's cgroup; per-process limits."""
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # we died before the line above
            os._exit(1)
        if cgroup is not None:
            cgroup.join()
        cpu = int(self.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (self.memory_mb << 20, self.memory_mb << 20))
        # real mode: model files in its cache
        size = (16 << 20) if self.offline else (self.cache_mb << 20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        if cgroup is None:  # the fallback: per uid, so it bounds a fork bomb (not for root)
            resource.setrlimit(resource.RLIMIT_NPROC, (256, 256))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def spec(self, db):
        if not self.offline:
            return dict(offline=False)
        return dict(offline=True, ids=sorted(db.model_ids()), id_class=db.model_classes())

    def environment(self, scratch):
        """The snippet's whole environment: nothing of ours (API keys, tokens) is passed on."""
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": scratch,
            "TMPDIR": scratch,
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }
        if not self.offline:  # the model cache, and the user's (secret-free) Hub settings
            env.update(
                HF_HOME=self.cache_dir, TORCH_HOME=self.cache_dir, XDG_CACHE_HOME=self.cache_dir
            )
            env.update(
                {
                    k: os.environ[k]
                    for k in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")
                    if k in os.environ
                }
            )
        return env

    def run(self, code, base_spec):
        """(verdict, detail) of one snippet; anything that goes wrong on our side is 'crashed',
        except a snippet's interpreter that cannot start: no snippet would run, so SandboxError."""
        if not code.strip():
            return "no_code", "the answer has no code section"
        try:
            return self.run_in(code, base_spec)
        except SandboxError:
            raise
        except Exception as e:  # one snippet's verdict, never a lost batch
            return "crashed", f"sandbox side: {type(e).__name__}: {e}"

    def run_in(self, code, base_spec):
        cgroup = self.cgroups.create() if self.cgroups else None
        scratch = str(SCRATCH) if self.isolated else tempfile.mkdtemp(prefix="rlaif-exec-")
        try:
            verdict, detail = self.launch(code, base_spec, scratch, cgroup)
            if cgroup is not None and verdict != "executable" and cgroup.oom_killed():
                verdict, detail = (
                    "runtime",
                    f"out of memory: its processes together used {self.memory_mb} MB",
                )
            return verdict, detail
        finally:
            if cgroup is not None:
                cgroup.remove()
            if not self.isolated:
                shutil.rmtree(scratch, ignore_errors=True)

    def job(self, code, base_spec):
        """What the supervisor needs: the runner's spec and argv, the limits it watches."""
        runner = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sandbox; sandbox.runner_main()"
        )
        argv = (drop_privileges() if self.isolated else []) + [sys.executable, "-I", "-c", runner]
        return dict(
            spec=dict(base_spec, code=code),
            runner=argv,
            wall_seconds=self.wall_seconds,
            max_output=self.max_output,
            chown=self.isolated and os.geteuid() == 0,
            cache_dir=None if self.offline else self.cache_dir,
            cache_mb=self.cache_mb,
        )

    def launch(self, code, base_spec, scratch, cgroup):
        # the supervisor's report to us; the snippet never holds it
        verdict_r, verdict_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()  # at EOF (we died) the supervisor ends the namespace
        with tempfile.TemporaryFile() as job_file, tempfile.TemporaryFile() as err:
            job_file.write(json.dumps(self.job(code, base_spec)).encode())
            job_file.seek(0)
            fds, parent = (verdict_w, lifeline_r, job_file.fileno()), os.getpid()
            sup = (
                f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sandbox; "
                f"sandbox.supervisor_main{fds}"
            )
            writable = [] if self.offline else [self.cache_dir]
            argv = (
                isolated_command(writable, self.offline, sup, self.disk_mb)
                if self.isolated
                else [sys.executable, "-I", "-c", sup]
            )  # --unsafe-exec: said loudly in the results
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=scratch,
                    env=self.environment(scratch),
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    pass_fds=fds,
                    start_new_session=True,
                    preexec_fn=lambda: self.launcher_setup(cgroup, parent),
                )
            finally:
                os.close(verdict_w)
                os.close(lifeline_r)
            try:
                try:
                    proc.wait(timeout=self.wall_seconds + GRACE)
                except subprocess.TimeoutExpired:
                    pass
                finally:
                    # unshare --kill-child: killing it kills the namespace's first process,
                    # hence all
                    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
                    if cgroup is not None:
                        cgroup.kill()
                    proc.wait()
                message = read_message(verdict_r)
            finally:
                os.close(verdict_r)
                os.close(lifeline_w)
            err.seek(max(0, err.seek(0, 2) - self.max_output))
            stderr = err.read().decode(errors="replace").strip().splitlines()
        return self.read_verdict(message, proc.returncode, stderr)

    @staticmethod
    def read_verdict(message, returncode, stderr):
        try:
            v = json.loads(message)
        except ValueError:
            last = stderr[-1] if stderr else f"exit {returncode}"
            return "crashed", f"no verdict from the supervisor ({last})"
        if "error" in v:
            raise SandboxError(f"sandbox: {v['error']}")
        if v.get("verdict") not in VERDICTS:
            return "crashed", f"unknown verdict {v.get('verdict')!r}"
        return v["verdict"], v.get("detail", "")

    def run_all(self, codes, db=None, on_done=None):
        """(verdict, detail) of each snippet, `workers` at a time; on_done(n finished)
        after each one (progress lines)."""
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


def read_message(fd, wait=5.0):
    """Everything the supervisor wrote, until EOF (all writers gone) or `wait` seconds."""
    chunks, end = [], time.monotonic() + wait
    while (
        time.monotonic() < end and select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]
    ):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def main():
    p = argparse.ArgumentParser(
        description="Run a code snippet in the executability sandbox and print its "
        "verdict, or check that OS-level isolation works on this machine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("file", nargs="?", help="a Python file to run")
    p.add_argument(
        "--check", action="store_true", help="only report whether isolation is available"
    )
    p.add_argument(
        "--real", action="store_true", help="real libraries and network instead of stand-ins"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="CPU seconds (the wall clock: WALL_FACTOR x)"
    )
    args = p.parse_args()
    if args.check or not args.file:
        reason = isolation_available()
        print(
            "isolation: available (unshare + setpriv)"
            if reason is None
            else f"isolation: UNAVAILABLE: {reason}"
        )
        sys.exit(0 if reason is None else 1)
    verdict, detail = Sandbox(offline=not args.real, timeout=args.timeout).run_all(
        [Path(args.file).read_text()]
    )[0]
    print(f"{verdict}: {detail}")


if __name__ == "__main__":
    main()
