"""In-memory stand-ins for what a ``worker.service.runtime.Runtime`` holds, for narrow unit tests of the service
functions (enrol, verify, reissue, revoke, bulk, erase):

- ``FakeS3``: a boto3 S3 client look-alike (PutObject with If-None-Match / If-Match, GetObject with Range,
  HeadObject, DeleteObject(s), ListObjectsV2 with Prefix / Delimiter / StartAfter and pages) under the real
  ``worker.storage.client.ObjectStore``, so the storage code (versions, fences, erasure records) runs unchanged;
  ``before_put`` hooks let a test act "concurrently" at an exact write;
- ``FakeRedis``: the commands and the three Lua scripts ``worker.storage.jobbook.JobBook`` uses, under the real
  ``JobBook``;
- ``PixelEngine``: the real ``worker.algorithm.pipeline.Engine`` on the tiny seeded models of ``tiny_models.py``,
  with ``prepare`` resizing instead of detecting (tiny faces are not faces);
- ``FakeRuntime`` and ``FakeDispatch``. The runtime's engine hook is the one function ``engine_hook``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from botocore.exceptions import ClientError
from PIL import Image
from tiny_models import RES, person_faces, tiny_bundle

from worker.algorithm.config import EngineConfig
from worker.algorithm.pipeline import Engine
from worker.keys.providers import KeyRegistry, LocalKeyring, write_keyring
from worker.service.engine import LoadedEngine
from worker.settings import EngineSettings, KeysSettings, S3Settings, Settings, WorkerSettings
from worker.storage.client import ObjectStore
from worker.storage.jobbook import JobBook

BUCKET = "out"
INPUTS = "out-inputs"  # the default input bucket of ``BUCKET`` (worker.contracts.inputs)
KEYS = ("k1", "k2", "k3")


# --- S3 ---------------------------------------------------------------------------------------------------------
def _error(code: str, status: int, op: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@dataclass
class _Obj:
    body: bytes
    etag: str
    modified: datetime
    content_type: str = "application/octet-stream"


class _Body:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int | None = None) -> bytes:
        return self._f.read() if n is None else self._f.read(n)

    def iter_chunks(self, chunk_size: int = 1024) -> Iterator[bytes]:
        while chunk := self._f.read(chunk_size):
            yield chunk

    def close(self) -> None:
        self._f.close()


class _Paginator:
    def __init__(self, s3: FakeS3) -> None:
        self.s3 = s3

    def paginate(self, **kw: Any) -> Iterator[dict[str, Any]]:
        return self.s3._list_pages(**kw)


class FakeS3:
    """An in-memory S3 (the subset of the boto3 client ``ObjectStore`` and the bulk reader call), thread-safe.

    ``before_put``: callables ``(bucket, key)`` run before every PutObject (after its arguments are checked, before
    its condition is evaluated): a test's "concurrent" writer. ``calls``: (operation, bucket, key) of every request.
    """

    def __init__(self, page_size: int = 1000) -> None:
        self.buckets: dict[str, dict[str, _Obj]] = {}
        self.page_size = page_size
        self.before_put: list[Callable[[str, str], None]] = []
        self.calls: list[tuple[str, str, str]] = []
        self.ranges: list[tuple[str, str | None]] = []  # (key, Range header) of every GetObject
        self.start_afters: list[tuple[str, str | None]] = []  # (prefix, StartAfter) of every listing
        self._lock = threading.RLock()

    def _bucket(self, name: str, op: str) -> dict[str, _Obj]:
        b = self.buckets.get(name)
        if b is None:
            raise _error("NoSuchBucket", 404, op)
        return b

    def create_bucket(self, Bucket: str, **_: Any) -> dict[str, Any]:
        with self._lock:
            self.buckets.setdefault(Bucket, {})
        return {}

    def head_bucket(self, Bucket: str) -> dict[str, Any]:
        self._bucket(Bucket, "HeadBucket")
        return {}

    def put_object(
        self,
        Bucket: str,
        Key: str,
        Body: bytes,
        ContentType: str = "application/octet-stream",
        IfNoneMatch: str | None = None,
        IfMatch: str | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        self.calls.append(("put", Bucket, Key))
        for hook in list(self.before_put):
            hook(Bucket, Key)
        data = bytes(Body)
        with self._lock:
            b = self._bucket(Bucket, "PutObject")
            cur = b.get(Key)
            if IfNoneMatch == "*" and cur is not None:
                raise _error("PreconditionFailed", 412, "PutObject")
            if IfMatch is not None and (cur is None or cur.etag != IfMatch):
                raise _error("PreconditionFailed", 412, "PutObject")
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            b[Key] = _Obj(data, etag, datetime.now(UTC), ContentType)
        return {"ETag": etag}

    def get_object(self, Bucket: str, Key: str, Range: str | None = None) -> dict[str, Any]:
        self.calls.append(("get", Bucket, Key))
        self.ranges.append((Key, Range))
        with self._lock:
            o = self._bucket(Bucket, "GetObject").get(Key)
            if o is None:
                raise _error("NoSuchKey", 404, "GetObject")
            data = o.body
        if Range is not None:
            first_s, _, last_s = Range.removeprefix("bytes=").partition("-")
            first = int(first_s)
            if first >= len(data):
                raise _error("InvalidRange", 416, "GetObject")
            data = data[first : (int(last_s) + 1 if last_s else None)]
        return {"Body": _Body(data), "ContentLength": len(data), "ETag": o.etag, "LastModified": o.modified}

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        with self._lock:
            o = self._bucket(Bucket, "HeadObject").get(Key)
        if o is None:
            raise _error("404", 404, "HeadObject")
        return {"ETag": o.etag, "ContentLength": len(o.body), "LastModified": o.modified}

    def delete_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        self.calls.append(("delete", Bucket, Key))
        with self._lock:
            self._bucket(Bucket, "DeleteObject").pop(Key, None)
        return {}

    def delete_objects(self, Bucket: str, Delete: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            b = self._bucket(Bucket, "DeleteObjects")
            for o in Delete["Objects"]:
                self.calls.append(("delete", Bucket, o["Key"]))
                b.pop(o["Key"], None)
        return {"Errors": []}

    def get_paginator(self, name: str) -> _Paginator:
        assert name == "list_objects_v2", name
        return _Paginator(self)

    def _list_pages(
        self,
        Bucket: str,
        Prefix: str = "",
        Delimiter: str | None = None,
        StartAfter: str | None = None,
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("list", Bucket, Prefix))
        self.start_afters.append((Prefix, StartAfter))
        with self._lock:
            items = sorted(self._bucket(Bucket, "ListObjectsV2").items())
        entries: list[tuple[str, Any]] = []  # ("c", object) or ("p", common prefix), in key order
        seen: set[str] = set()
        for k, o in items:
            if not k.startswith(Prefix) or (StartAfter is not None and k <= StartAfter):
                continue
            if Delimiter:
                cut = k.find(Delimiter, len(Prefix))
                if cut >= 0:
                    cp = k[: cut + len(Delimiter)]
                    if cp not in seen:
                        seen.add(cp)
                        entries.append(("p", cp))
                    continue
            entries.append(("c", {"Key": k, "ETag": o.etag, "Size": len(o.body), "LastModified": o.modified}))
        for i in range(0, max(len(entries), 1), self.page_size):
            page = entries[i : i + self.page_size]
            out: dict[str, Any] = {}
            contents = [e for kind, e in page if kind == "c"]
            prefixes = [{"Prefix": e} for kind, e in page if kind == "p"]
            if contents:
                out["Contents"] = contents
            if prefixes:
                out["CommonPrefixes"] = prefixes
            yield out

    # --- test helpers ---------------------------------------------------------------------------------------------
    def keys(self, bucket: str = BUCKET, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self.buckets.get(bucket, {}) if k.startswith(prefix))

    def put_once_before(self, match: Callable[[str], bool], action: Callable[[], None]) -> None:
        """Run ``action`` once, just before the first PutObject whose key satisfies ``match``."""
        done = threading.Event()

        def hook(bucket: str, key: str) -> None:
            if not done.is_set() and match(key):
                done.set()
                action()

        self.before_put.append(hook)


# --- Redis ------------------------------------------------------------------------------------------------------
def _b(x: Any) -> bytes:
    return x if isinstance(x, bytes) else str(x).encode()


class _Pipeline:
    def __init__(self, r: FakeRedis) -> None:
        self.r = r
        self.ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., _Pipeline]:
        def queue(*a: Any, **kw: Any) -> _Pipeline:
            self.ops.append((name, a, kw))
            return self

        return queue

    def execute(self) -> list[Any]:
        with self.r.lock:
            return [getattr(self.r, name)(*a, **kw) for name, a, kw in self.ops]


class FakeRedis:
    """The Redis commands ``JobBook`` sends (bytes replies, like redis-py without ``decode_responses``). TTLs are
    accepted and ignored. Lua: exactly the scripts of ``JobBook``, re-implemented; any other script fails loudly."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}  # str key -> bytes | dict[bytes, bytes] | set[bytes] | list[bytes]
        self.lock = threading.RLock()

    def pipeline(self, transaction: bool = True) -> _Pipeline:
        return _Pipeline(self)

    # strings
    def get(self, key: str) -> bytes | None:
        v = self.data.get(key)
        return v if isinstance(v, bytes) else None

    def set(self, key: str, value: Any, nx: bool = False, ex: int | None = None) -> bool | None:
        with self.lock:
            if nx and key in self.data:
                return None
            self.data[key] = _b(value)
            return True

    def incr(self, key: str) -> int:
        with self.lock:
            n = int(self.data.get(key, b"0")) + 1
            self.data[key] = _b(n)
            return n

    def decr(self, key: str) -> int:
        with self.lock:
            n = int(self.data.get(key, b"0")) - 1
            self.data[key] = _b(n)
            return n

    def expire(self, key: str, seconds: int) -> bool:
        return key in self.data

    def delete(self, *keys: str) -> int:
        with self.lock:
            return sum(self.data.pop(k, None) is not None for k in keys)

    def exists(self, *keys: str) -> int:
        return sum(k in self.data for k in keys)

    def scan_iter(self, match: str = "*", count: int = 10) -> Iterator[bytes]:
        with self.lock:
            keys = list(self.data)
        return iter([_b(k) for k in keys if fnmatch.fnmatchcase(k, match)])

    # hashes
    def _h(self, key: str) -> dict[bytes, bytes]:
        h = self.data.setdefault(key, {})
        assert isinstance(h, dict), f"WRONGTYPE {key}"
        return h

    def hset(self, key: str, field: Any = None, value: Any = None, mapping: dict[Any, Any] | None = None) -> int:
        with self.lock:
            h = self._h(key)
            pairs = dict(mapping or {})
            if field is not None:
                pairs[field] = value
            new = sum(_b(k) not in h for k in pairs)
            h.update({_b(k): _b(v) for k, v in pairs.items()})
            return new

    def hsetnx(self, key: str, field: Any, value: Any) -> int:
        with self.lock:
            h = self._h(key)
            if _b(field) in h:
                return 0
            h[_b(field)] = _b(value)
            return 1

    def hget(self, key: str, field: Any) -> bytes | None:
        h = self.data.get(key)
        return h.get(_b(field)) if isinstance(h, dict) else None

    def hmget(self, key: str, fields: list[Any]) -> list[bytes | None]:
        return [self.hget(key, f) for f in fields]

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        h = self.data.get(key)
        return dict(h) if isinstance(h, dict) else {}

    def hvals(self, key: str) -> list[bytes]:
        return list(self.hgetall(key).values())

    def hexists(self, key: str, field: Any) -> bool:
        return self.hget(key, field) is not None

    def hdel(self, key: str, *fields: Any) -> int:
        with self.lock:
            h = self.data.get(key)
            if not isinstance(h, dict):
                return 0
            n = sum(h.pop(_b(f), None) is not None for f in fields)
            if not h:
                del self.data[key]
            return n

    def hscan_iter(self, key: str, count: int = 10) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.hgetall(key).items()))

    # sets
    def _set(self, key: str) -> set[bytes]:
        s = self.data.setdefault(key, set())
        assert isinstance(s, set), f"WRONGTYPE {key}"
        return s

    def sadd(self, key: str, *members: Any) -> int:
        with self.lock:
            s = self._set(key)
            new = {_b(m) for m in members} - s
            s.update(new)
            return len(new)

    def srem(self, key: str, *members: Any) -> int:
        with self.lock:
            s = self.data.get(key)
            if not isinstance(s, set):
                return 0
            gone = {_b(m) for m in members} & s
            s -= gone
            if not s:
                del self.data[key]
            return len(gone)

    def sismember(self, key: str, member: Any) -> bool:
        s = self.data.get(key)
        return isinstance(s, set) and _b(member) in s

    def smismember(self, key: str, members: list[Any]) -> list[bool]:
        return [self.sismember(key, m) for m in members]

    def scard(self, key: str) -> int:
        s = self.data.get(key)
        return len(s) if isinstance(s, set) else 0

    def srandmember(self, key: str, number: int) -> list[bytes]:
        s = self.data.get(key)
        return sorted(s)[:number] if isinstance(s, set) else []

    # lists
    def _l(self, key: str) -> list[bytes]:
        v = self.data.setdefault(key, [])
        assert isinstance(v, list), f"WRONGTYPE {key}"
        return v

    def lpush(self, key: str, *values: Any) -> int:
        with self.lock:
            lst = self._l(key)
            for v in values:
                lst.insert(0, _b(v))
            return len(lst)

    def lrem(self, key: str, count: int, value: Any) -> int:
        with self.lock:
            lst = self.data.get(key)
            if not isinstance(lst, list):
                return 0
            keep = [x for x in lst if x != _b(value)]
            n = len(lst) - len(keep)
            lst[:] = keep
            return n

    def lrange(self, key: str, start: int, stop: int) -> list[bytes]:
        lst = self.data.get(key)
        if not isinstance(lst, list):
            return []
        return lst[start : (None if stop == -1 else stop + 1)]

    # Lua
    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        keys, argv = list(keys_and_args[:numkeys]), [_b(a).decode() for a in keys_and_args[numkeys:]]
        with self.lock:
            if script == JobBook._CLAIM_SUBJECTS:
                out = []
                for i in range(1, len(argv), 2):
                    self.hsetnx(keys[0], argv[i], argv[i + 1])
                    out.append(self.hget(keys[0], argv[i]))
                return out
            if script == JobBook._ADVANCE_BULK:
                c = int(self.hget(keys[0], "cursor") or -1)
                if int(argv[0]) > c:
                    c = int(argv[0])
                    self.hset(keys[0], "cursor", argv[0])
                self.hset(keys[0], mapping={"enqueued": c, "rows_seen": argv[0], "updated": argv[1]})
                if argv[2] != "":
                    r = int(self.hget(keys[0], "resume_index") or -1)
                    lines = int(self.hget(keys[0], "resume_lines") or -1)
                    if int(argv[2]) > r or (int(argv[2]) == r and int(argv[4]) > lines):
                        self.hset(
                            keys[0],
                            mapping={
                                "resume_index": argv[2],
                                "resume_offset": argv[3],
                                "resume_lines": argv[4],
                                "header_bytes": argv[5],
                                "resume_key": argv[7],
                            },
                        )
                return c
            if "'cursor'" in script and "enqueued" not in script:  # JobBook.set_cursor
                if int(argv[0]) > int(self.hget(keys[0], "cursor") or -1):
                    self.hset(keys[0], "cursor", argv[0])
                return 1
        raise NotImplementedError("FakeRedis: a Lua script it does not know (add it here)")


# --- engine -----------------------------------------------------------------------------------------------------
class PixelEngine(Engine):
    """The real engine on tiny models; ``prepare`` resizes instead of detecting (tiny faces are not faces)."""

    def prepare(self, image_rgb_uint8: np.ndarray) -> torch.Tensor:
        img = Image.fromarray(image_rgb_uint8).resize((RES, RES), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def tiny_loaded_engine(steps: int = 2, policy: Any = None, matcher: str = "") -> LoadedEngine:
    config = EngineConfig(steps=steps, max_batch_images=8)
    engine = PixelEngine(tiny_bundle(linear_identity=True), config, torch.device("cpu"))
    fp = engine.fingerprint
    return LoadedEngine(
        engine=engine,
        bundle_id="tiny-test",
        bundle_hashes={},
        algorithm={"fingerprint": fp},
        device="cpu",
        load_seconds=0.0,
        fingerprint=fp,
        verify_threshold=0.5,
        policy=policy,
        matcher=matcher,
    )


def face_png(person: int, capture: int = 0, size: int = 32) -> bytes:
    """A synthetic face photo (PNG, ``size`` px) of ``person``; captures differ by small seeded noise."""
    face = person_faces(1, person, seed=capture)[0]
    arr = ((face.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((size, size), Image.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


# --- runtime ----------------------------------------------------------------------------------------------------
@dataclass
class EngineRun:
    """One engine call the service made: its job type and how many subjects and images it carried."""

    job_type: str
    subjects: int
    images: int


def engine_hook(rt: FakeRuntime, job_type: str, subjects: list[tuple[torch.Tensor, bytes]]) -> list[Any]:
    """The fake runtime's engine hook: the service's own ``EngineCall`` on ``rt.loaded``, without a micro-batcher,
    recorded in ``rt.engine_calls``; raises ``rt.engine_fault`` when set."""
    from worker.service.engine import EngineCall

    rt.engine_calls.append(EngineRun(job_type, len(subjects), sum(int(f.shape[0]) for f, _ in subjects)))
    if rt.engine_fault is not None:
        raise rt.engine_fault
    return list(EngineCall(rt.loaded)(job_type, subjects))


@dataclass
class FakeRuntime:
    """``worker.service.runtime.Runtime`` on the fakes above, a real local keyring and the tiny engine."""

    settings: Settings
    s3: FakeS3
    store: ObjectStore
    redis: FakeRedis
    book: JobBook
    keys: LocalKeyring
    loaded: LoadedEngine
    engine_calls: list[EngineRun] = field(default_factory=list)
    engine_fault: BaseException | None = None

    def engine(self) -> LoadedEngine:
        return self.loaded

    def engine_call(self, job_type: str, subjects: list[tuple[torch.Tensor, bytes]]) -> list[Any]:
        return engine_hook(self, job_type, subjects)

    # --- helpers --------------------------------------------------------------------------------------------------
    def put_input(self, tenant: str, name: str, body: bytes) -> str:
        """An object in ``tenant``'s input prefix (where its jobs may read); returns its s3:// URI."""
        key = f"tenants/{tenant}/{name}"
        self.s3.put_object(Bucket=INPUTS, Key=key, Body=body)
        return f"s3://{INPUTS}/{key}"


def make_runtime(tmp: Path, loaded: LoadedEngine, **worker: Any) -> FakeRuntime:
    s3 = FakeS3()
    for b in (BUCKET, INPUTS):
        s3.create_bucket(Bucket=b)
    keyring = tmp / "keyring.json"
    write_keyring(keyring, list(KEYS))
    settings = Settings(
        s3=S3Settings(bucket=BUCKET),
        keys=KeysSettings(provider="local", keyring_path=keyring),
        engine=EngineSettings(bundle="lite", device="cpu", steps=2),
        worker=WorkerSettings(**worker),
    )
    store = ObjectStore(s3, BUCKET)
    redis = FakeRedis()
    return FakeRuntime(settings, s3, store, redis, JobBook(redis), LocalKeyring(keyring, KeyRegistry(store)), loaded)


@dataclass
class FakeDispatch:
    """``worker.service.runtime.Dispatch`` that records what a fan-out job sends."""

    queue_depth: int = 0
    chunks: list[dict[str, Any]] = field(default_factory=list)
    enrolls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    continued: list[tuple[int, float | None]] = field(default_factory=list)

    def send_chunk(self, payload: dict[str, Any]) -> None:
        self.chunks.append(payload)

    def send_enrolls(self, pending: list[tuple[str, dict[str, Any]]]) -> None:
        self.enrolls.extend(pending)

    def engine_queue_depth(self) -> int:
        return self.queue_depth

    def continue_job(self, job: Any, continuation: int, countdown: float | None = None) -> None:
        self.continued.append((continuation, countdown))
