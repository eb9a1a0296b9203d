"""One writer per checkpoint directory: a lock file that rank 0 takes before anything is written there.

    lock = RunLock.acquire("runs/exp1")   # raises LockHeld naming the holder
    ...                                   # train; a thread refreshes the lock's heartbeat
    lock.release()                        # at exit; a crashed run's lock is found stale later

`<dir>/run.lock` is created with O_CREAT | O_EXCL, which is atomic on local file systems and on the
shared ones clusters use (NFSv3 and v4, Lustre, GPFS, BeeGFS), and holds JSON naming its holder: host,
pid, the process's start time, boot id and pid namespace, the scheduler's job id, the command, a random
token. While the run lives a thread touches the file every HEARTBEAT_S seconds.

A lock is stale (taken over, with a note) when its holder certainly no longer runs:
  - same machine (same boot id and pid namespace): the pid is gone or belongs to a newer process;
  - same Slurm job with a lower restart count: Slurm requeues a job only after its processes ended;
  - otherwise (another node, another container): no heartbeat for STALE_AFTER_S seconds. The age is
    the file's mtime, read after open (NFS revalidates attributes on open), against this node's clock:
    nodes are assumed to keep time within seconds of each other (NTP), as schedulers already assume.
Takeover renames the stale file aside first and checks that the file it moved is the one it judged,
so two runs that find the same stale lock cannot both win.

Why not flock/fcntl locks: they vanish with their process, which is what one wants, but on several
shared file systems they are node-local or off unless mounted so (Lustre `localflock`/`noflock`, BeeGFS
by default) and on NFSv3 they need lockd/statd, often missing in containers: the failure is silent and
two runs would write one directory again. A file created with O_EXCL works everywhere and can say who
holds it; the price is that a run killed on another node blocks the directory for STALE_AFTER_S.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class LockError(RuntimeError):
    """The checkpoint directory cannot be locked; the message says why and what to do."""


class LockHeld(LockError):
    """Another run holds the checkpoint directory; the message names it and says what to do."""


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The scheduler's or launcher's id of this job: "slurm 4242", "torchelastic abc", "mpirun ..."."""
    source = os.environ if env is None else env
    for var, kind in (("SLURM_JOB_ID", "slurm"), ("TORCHELASTIC_RUN_ID", "torchelastic"), ("PMIX_NAMESPACE", "mpirun")):
        if source.get(var):
            return f"{kind} {source[var]}"
    return None


def identity(token: str) -> dict[str, Any]:
    """What a lock file says about this process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": _process_start(os.getpid()),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
        "job": job_id(),
        "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "command": " ".join(sys.argv)[:500],
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "heartbeat_s": HEARTBEAT_S,
        "token": token,
    }


def _read(path: Path) -> tuple[bytes, Optional[dict], float]:
    """(raw bytes, parsed JSON or None, mtime) of the lock; FileNotFoundError when there is none."""
    with open(path, "rb") as f:  # open, then fstat: NFS revalidates the attributes on open
        raw = f.read()
        mtime = os.fstat(f.fileno()).st_mtime
    try:
        info = json.loads(raw)
        return raw, info if isinstance(info, dict) else None, mtime
    except ValueError:
        return raw, None, mtime  # being written right now, or damaged


def stale_reason(info: Optional[dict], mtime: float, me: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the lock is stale, or None when its holder may still run."""
    now = time.time() if now is None else now
    age = now - mtime
    if info is None:
        return f"unreadable and untouched for {age:.0f} s" if age > STALE_AFTER_S else None
    same_machine = (
        info.get("boot_id")
        and info.get("boot_id") == me["boot_id"]
        and info.get("pid_namespace") == me["pid_namespace"]
    )
    if same_machine:
        started = _process_start(int(info.get("pid", -1)))
        if started is None or info.get("started") is None or abs(started - info["started"]) > 0.5:
            return f"process {info.get('pid')} on this machine is gone"
        return None
    if (
        info.get("job")
        and info.get("job") == me["job"]
        and str(info["job"]).startswith("slurm")
        and int(info.get("restart", 0)) < me["restart"]
    ):
        return f"it is the previous run (restart {info.get('restart', 0)}) of this Slurm job"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe_holder(info: Optional[dict], mtime: float, me: dict) -> str:
    if info is None:
        return "a run whose lock file is being written or is unreadable"
    where = "this machine" if info.get("host") == me["host"] else f"host {info.get('host')}"
    parts = [f"pid {info.get('pid')} on {where}"]
    if info.get("job"):
        parts.append(f"job {info['job']}")
    parts.append(f"since {info.get('since')}")
    text = ", ".join(parts) + f", last heartbeat {max(0.0, time.time() - mtime):.0f} s ago"
    return text + (f"; command: {info['command']}" if info.get("command") else "")


class RunLock:
    """A held lock: `release()` removes it (only if it is still ours); a daemon thread beats."""

    def __init__(self, path: Path, token: str, took_over: Optional[str] = None, heartbeat: float = HEARTBEAT_S):
        self.path, self.token, self.took_over = path, token, took_over
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), name="megagpt2-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, directory: str, heartbeat: float = HEARTBEAT_S) -> "RunLock":
        """Create `<directory>/run.lock` (and the directory); LockHeld if a live run holds it,
        LockError if the directory cannot be written."""
        path = Path(directory).resolve() / LOCK_NAME
        try:
            return cls._acquire(path, heartbeat)
        except OSError as e:
            raise LockError(
                f"checkpoint.dir {path.parent}: cannot create its lock file {path} ({e.strerror or e}); "
                f"give --checkpoint.dir a directory this run may write"
            ) from None

    @classmethod
    def _acquire(cls, path: Path, heartbeat: float = HEARTBEAT_S) -> "RunLock":
        path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        me = identity(token)
        took_over = None
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    raw, info, mtime = _read(path)
                except FileNotFoundError:
                    continue  # released meanwhile
                why = stale_reason(info, mtime, me)
                if why is None:
                    raise LockHeld(_held_message(path, describe_holder(info, mtime, me))) from None
                if _remove_stale(path, raw, token):
                    took_over = f"took over the stale lock {path} ({why}): {describe_holder(info, mtime, me)}"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            return cls(path, token, took_over, heartbeat)
        raise LockHeld(_held_message(path, "runs that keep taking it (tried 5 times)"))

    def held(self) -> bool:
        try:
            return self.token.encode() in _read(self.path)[0]
        except OSError:
            return False

    def release(self) -> None:
        self._stop.set()
        if self.held():
            try:
                self.path.unlink()
            except OSError:
                pass

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self.held():
                print(
                    f"megagpt2: warning: the lock {self.path} was removed or taken over by another run; "
                    f"two runs may now be writing this directory",
                    file=sys.stderr,
                    flush=True,
                )
                return
            try:
                os.utime(self.path)
            except OSError:
                pass  # a file system hiccup; the next beat tries again


def _remove_stale(path: Path, raw: bytes, token: str) -> bool:
    """Move the stale lock aside; if what moved is not what was judged stale, put it back."""
    aside = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = aside.read_bytes()
        if moved != raw:  # another run replaced the stale lock between our read and the rename
            try:
                os.link(aside, path)
            except OSError:
                pass
            return False
        return True
    finally:
        aside.unlink(missing_ok=True)


def _held_message(path: Path, holder: str) -> str:
    return (
        f"checkpoint.dir {path.parent} is in use by another run: {holder} (lock file {path}). Two runs "
        f"writing one directory overwrite each other's checkpoints and metrics: wait for that run or stop "
        f"it, or give this one another --checkpoint.dir. If that run is gone, its lock counts as stale "
        f"{STALE_AFTER_S:.0f} s after its last heartbeat (at once on the same machine); deleting the lock "
        f"file takes it over now"
    )
