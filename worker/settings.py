"""All runtime configuration, from the environment, with one prefix: ``CANCELABLE_``.

Groups nest with ``__``: ``CANCELABLE_S3__ENDPOINT_URL``, ``CANCELABLE_WORKER__TASK_TIME_LIMIT``, ...
Secrets come from files in either of two ways:

- ``CANCELABLE_S3__SECRET_ACCESS_KEY_FILE=/run/secrets/s3_secret`` (any field; the file's content, stripped, is the
  value; the plain variable wins if both are set);
- a secrets directory (``CANCELABLE_SECRETS_DIR``, default ``/run/secrets`` when it exists) holding files named like the
  variables without prefix, nested with ``__``: ``s3__secret_access_key``.

``get_settings()`` validates once and caches; errors name the variable to fix and never echo secret values.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NestedSecretsSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "CANCELABLE_"
NESTED = "__"
REPO = Path(__file__).resolve().parents[1]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RedisSettings(_Group):
    """Broker, result backend, counters and locks."""

    url: SecretStr | None = None
    """May carry a password, hence secret. No default on purpose: a worker or producer that is not told which Redis
    to use must not guess one (a guessed ``127.0.0.1:6379`` may be someone else's). Use ``require_url()``."""

    def require_url(self) -> str:
        """The configured URL; ``SettingsError`` naming the variable when it is not set."""
        if self.url is None:
            raise SettingsError(
                f"invalid configuration:\n  {ENV_PREFIX}REDIS{NESTED}URL: not set; name the Redis of your deployment, "
                "e.g. redis://127.0.0.1:6379/0 (the local stack writes it to .stack/env: `source .stack/env`)"
            )
        return self.url.get_secret_value()


class S3Settings(_Group):
    endpoint_url: str | None = None
    """``None`` means AWS; the local stack sets ``http://127.0.0.1:8333``."""
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    bucket: str = "cancelable"
    """Bucket for templates, cancelable images, key state, revocations and dead letters. Never a valid input."""
    input_bucket: str | None = None
    """Where producers put source images (default ``<bucket>-inputs``); a tenant reads ``tenants/<tenant>/`` in it."""
    input_allow: dict[str, list[str]] = Field(default_factory=dict)
    """Extra input prefixes per tenant (JSON: ``{"acme": ["s3://acme-photos/"], "*": [...]}``; ``{tenant}`` is
    replaced). See ``worker.contracts.inputs``; entries in the output bucket are refused at start-up."""
    prefix: str = ""
    """Optional key prefix inside the bucket (no leading or trailing slash)."""
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    sse_kms_key_id: str | None = None
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    max_attempts: int = Field(default=5, ge=1, le=20)
    """botocore retry attempts (standard mode) for transient S3 faults."""
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=30.0, gt=0)
    max_pool_connections: int = Field(default=32, ge=1, le=1024)
    """HTTP connections one S3 client keeps open: at least the threads that share it (a threads-pool engine
    worker's 16 task threads, a key revocation's 16 listing readers); botocore's default is 10."""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if v.startswith("/") or v.endswith("/") or "//" in v:
            raise ValueError("s3.prefix must not start or end with '/' nor contain '//'")
        return v

    @model_validator(mode="after")
    def _sse(self) -> S3Settings:
        if self.sse == "aws:kms" and not self.sse_kms_key_id:
            raise ValueError("s3.sse=aws:kms needs s3.sse_kms_key_id (CANCELABLE_S3__SSE_KMS_KEY_ID)")
        if self.sse != "aws:kms" and self.sse_kms_key_id:
            raise ValueError("s3.sse_kms_key_id is set but s3.sse is not aws:kms")
        from worker.contracts.inputs import InputPolicy

        InputPolicy.from_settings(self)  # validates the allow-list (never the output bucket)
        if self.input_bucket is not None and self.input_bucket == self.bucket:
            raise ValueError("s3.input_bucket must differ from s3.bucket (templates are never inputs)")
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both s3.access_key_id and s3.secret_access_key, or neither (ambient credentials)")
        return self


class KeysSettings(_Group):
    provider: Literal["local", "kms"] = "local"
    keyring_path: Path = REPO / ".stack" / "keyring.json"
    """Local provider only: JSON file key_id -> key material (mode 0600)."""
    kms_endpoint_url: str | None = None
    """KMS provider only: ``None`` means AWS; tests point it at moto's server."""
    kms_region: str | None = None
    """Defaults to ``s3.region``."""
    kms_access_key_id: SecretStr | None = None
    kms_secret_access_key: SecretStr | None = None
    kms_key_map: dict[str, str] = Field(default_factory=dict)
    """KMS provider only: the key IDs jobs name -> the KMS key each one uses (a key UUID, ``alias/...`` or ARN),
    as JSON: ``{"acme-2026": "alias/cancelable-acme-2026"}``. When set, only these key IDs are known, and every
    mapped KMS key is checked at worker start (exists, enabled, ``HMAC_256`` / ``GENERATE_VERIFY_MAC``). Empty: a
    job's key ID is passed to KMS as it is."""

    @model_validator(mode="after")
    def _key_map(self) -> KeysSettings:
        from worker.contracts.ids import check_key_id

        if self.kms_key_map and self.provider != "kms":
            raise ValueError("keys.kms_key_map is set but keys.provider is not kms")
        for key_id, kms_key in self.kms_key_map.items():
            try:
                check_key_id(key_id), check_key_id(kms_key)
            except ValueError:
                raise ValueError(
                    f"keys.kms_key_map entry {key_id[:64]!r}: key IDs and KMS keys are 1-256 characters of "
                    "[A-Za-z0-9._:/-]"
                ) from None
        return self


class EngineSettings(_Group):
    bundle: str = "keymap"
    """``keymap`` (the embedded default: DCGAN + learned key map), ``lite`` (the first bundle, a test fixture of a
    source checkout: ``tests/fixtures/bundles/lite``), a local directory, or ``s3://bucket/prefix/`` (synced into the
    cache dir)."""
    bundle_cache_dir: Path = REPO / ".stack" / "bundles"
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    steps: int = Field(default=50, ge=1, le=10_000)
    batch_size: int = Field(default=8, ge=1, le=1024)
    mixed_precision: bool = False
    micro_batching: bool = True
    """Engine workers run the engine work of several jobs (enrol, verify, re-enrolment chunks; one lane per job
    type) as one engine call of up to ``batch_size`` images (``worker.tasks.batcher``); it takes the ``threads``
    pool (``Procfile``). false: one job per engine call, the behaviour before micro-batching."""
    batch_fill_timeout_ms: float = Field(default=100.0, ge=0.0, le=10_000.0)
    """Longest time the oldest waiting job waits for batch mates that could come from the broker (a batch runs
    earlier when it is full or when nothing more can arrive for it, so a lone job on an idle worker is not
    delayed)."""
    batch_mate_wait_ms: float = Field(default=5000.0, ge=0.0, le=60_000.0)
    """Longest time the oldest waiting job waits, on an idle engine, for batch mates that tasks of the same worker
    process are still preparing (download, decode, align). Those are certain to come, and one engine call of a full
    batch costs about as much as one of a partial batch, so this is a latency bound rather than a guess; it matters
    at the start of a burst, when many task threads share a few cores and all finish preparing at about the same
    time."""
    verify_threshold: float = Field(default=0.5, ge=-1.0, le=1.0)
    """Cosine score at or above which a probe is accepted."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("engine.device must be auto, cpu, cuda or cuda:N")


class WorkerSettings(_Group):
    task_time_limit: int = Field(default=180, ge=1)
    """Hard limit per task, seconds. Engine tasks are one subject (or one chunk) each and fan-out tasks hand over
    to a fresh task after ``fanout_time_budget``, so minutes suffice; raise it with the visibility timeout for a
    slow device."""
    task_soft_time_limit: int | None = None
    """Defaults to 90 % of the hard limit."""
    visibility_timeout: int = Field(default=240, ge=1)
    """Redis redelivers an unacked task after this many seconds: must exceed the task time limit. It is also how
    long the job of a SIGKILLed worker waits before another worker retries it (about 4 minutes by default)."""
    fanout_time_budget: float | None = Field(default=None, ge=0)
    """Seconds a bulk or key-revocation listing task runs before handing over (default: half the soft limit)."""
    max_attempts: int = Field(default=3, ge=1, le=100)
    """Deliveries that crashed or timed out before a job is dead-lettered (a job that kills its worker counts)."""
    transient_retry_window: float = Field(default=300.0, ge=0)
    """Seconds from a job's first transient fault (S3, Redis or KMS unreachable) during which it is retried with
    jittered exponential backoff (1 s doubling to 30 s); then it is dead-lettered."""
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest accepted source image object (a 200-megapixel phone JPEG is 30-60 MB)."""
    max_pixels: int = Field(default=200_000_000, ge=64 * 64)
    """Largest accepted JPEG (width x height, as its header declares). JPEGs are decoded at a reduced scale (PIL draft
    mode) close to ``decode_max_side``, so their cost is bounded whatever their size."""
    max_pixels_full_decode: int = Field(default=40_000_000, ge=64 * 64)
    """Largest accepted PNG or WebP (these decode at full size before downscaling); guards against decompression
    bombs."""
    decode_max_side: int = Field(default=4096, ge=256, le=65_535)
    """Decoded photos are downscaled to at most this many pixels on their longer side before detection (detection
    itself runs at 1280; the aligned crop is taken from this image)."""
    revoke_chunk_size: int = Field(default=50, ge=1, le=10_000)
    interactive_slots: int = Field(default=4, ge=0, le=1_000)
    """Task slots of a threads-pool engine worker that background work (bulk enrolment children, re-enrolment
    chunks) never takes: while the others are all busy with it, the worker stops taking messages from the bulk queue,
    so an enrol or verify starts at once and waits at most for the engine batch that runs."""
    revoke_max_queued_chunks: int = Field(default=8, ge=1, le=100_000)
    """Backpressure of a key revocation: its listing pauses while more than this many of its re-enrolment chunks are
    unfinished, so at most this many + 1 are in flight. A chunk prepares and commits its subjects one after another,
    so this, not the fleet, caps a large revocation's rate beyond this many engine workers: raise it to about twice
    the engine workers (``scripts/capacity.py``, docs/performance.md)."""
    sweep_staging_interval: int = Field(default=3600, ge=0)
    """Seconds between Celery beat's ``sweep_staging`` and ``sweep_uploads`` runs (0: no periodic sweep). Objects a
    crashed commit left in staging are deleted once older than the visibility timeout."""
    upload_retention: int = Field(default=86400, ge=0)
    """Seconds the CLI's uploaded source photos (``tenants/<t>/uploads/`` in the input bucket) are kept before
    ``sweep_uploads`` deletes them, whatever became of their job (0: kept until deleted by hand)."""
    template_retention_days: int = Field(default=0, ge=0)
    """Days a subject is kept after its current version was committed; Celery beat's daily ``sweep_retention``
    erases older subjects as ``cancelable erase`` does (0: off, subjects are kept until erased on request)."""

    @model_validator(mode="after")
    def _limits(self) -> WorkerSettings:
        if self.visibility_timeout <= self.task_time_limit:
            raise ValueError(
                f"worker.visibility_timeout ({self.visibility_timeout}s) must exceed worker.task_time_limit "
                f"({self.task_time_limit}s), otherwise Redis redelivers running tasks and they run twice"
            )
        if self.task_soft_time_limit is not None and self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("worker.task_soft_time_limit must be below worker.task_time_limit")
        return self

    @property
    def soft_time_limit(self) -> int:
        return self.task_soft_time_limit or max(1, int(self.task_time_limit * 0.9))

    @property
    def fanout_budget(self) -> float:
        """Seconds a bulk or key-revocation listing task runs before it hands over to a fresh task."""
        return self.fanout_time_budget if self.fanout_time_budget is not None else self.soft_time_limit * 0.5


class MetricsSettings(_Group):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9808, ge=0, le=65535)
    multiproc_dir: Path | None = None
    """Where a worker's processes write their metric files (``PROMETHEUS_MULTIPROC_DIR`` wins when set). None: a
    private directory under the temp dir, made when the worker starts and removed when it stops
    (``worker.tasks.app``), so every way of starting a worker counts its pool's jobs."""


class SentrySettings(_Group):
    dsn: SecretStr | None = None
    environment: str = "development"
    release: str | None = None
    traces_sample_rate: float = Field(default=0.0, ge=0.0, le=1.0)


class _FileSuffixSource(PydanticBaseSettingsSource):
    """Reads ``CANCELABLE_<GROUP>__<FIELD>_FILE=<path>`` into ``<group>.<field>`` (the file content, stripped)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, raw in os.environ.items():
            up = name.upper()
            if not (up.startswith(ENV_PREFIX) and up.endswith("_FILE")) or up == ENV_PREFIX + "SECRETS_DIR":
                continue
            path_parts = up[len(ENV_PREFIX) : -len("_FILE")].lower().split(NESTED)
            if len(path_parts) != 2 or path_parts[0] not in self.settings_cls.model_fields:
                raise ValueError(f"{name}: expected {ENV_PREFIX}<GROUP>{NESTED}<FIELD>_FILE")
            p = Path(raw)
            try:
                value = p.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ValueError(f"{name}: cannot read secret file {p}: {e.strerror}") from None
            out.setdefault(path_parts[0], {})[path_parts[1]] = value
        return out


class _EnvWithoutFileVars(PydanticBaseSettingsSource):
    """The plain environment source minus ``*_FILE`` variables (``_FileSuffixSource`` reads those)."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.inner = inner

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = self.inner()
        for group, values in list(data.items()):
            if isinstance(values, dict):
                data[group] = {k: v for k, v in values.items() if not k.lower().endswith("_file")}
        return data


def _unknown_groups(settings_cls: type[BaseSettings]) -> list[str]:
    """``CANCELABLE_<GROUP>__...`` variables whose group does not exist (a typo would otherwise be ignored)."""
    bad = []
    for name in os.environ:
        up = name.upper()
        if up.startswith(ENV_PREFIX) and NESTED in up:
            group = up[len(ENV_PREFIX) :].split(NESTED, 1)[0].lower()
            if group not in settings_cls.model_fields:
                bad.append(name)
    return sorted(bad)


def _secrets_dir() -> Path | None:
    d = os.environ.get(ENV_PREFIX + "SECRETS_DIR")
    if d:
        return Path(d)
    default = Path("/run/secrets")
    return default if default.is_dir() else None


class Settings(BaseSettings):
    """The whole configuration. Build it with ``get_settings()`` (cached) or ``load_settings()`` (fresh)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        secrets_nested_delimiter=NESTED,
        secrets_prefix="",
        secrets_dir_missing="ok",
        extra="forbid",
        case_sensitive=False,
    )

    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
    keys: KeysSettings = KeysSettings()
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()
    sentry: SentrySettings = SentrySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # priority: explicit init > env > *_FILE > secrets dir
        return (
            init_settings,
            _EnvWithoutFileVars(settings_cls, env_settings),
            _FileSuffixSource(settings_cls),
            NestedSecretsSettingsSource(file_secret_settings),
        )


class SettingsError(ValueError):
    """Configuration invalid; the message lists every problem with the variable that sets it (never its value)."""


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors(include_input=False, include_url=False):
        loc = [str(x) for x in err["loc"]]
        var = ENV_PREFIX + NESTED.join(x.upper() for x in loc) if loc else ENV_PREFIX + "*"
        lines.append(f"  {var}: {err['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build and validate settings from the environment (plus keyword overrides, e.g. ``s3={"bucket": "x"}``).

    Raises ``SettingsError`` with one line per problem.
    """
    unknown = _unknown_groups(Settings)
    if unknown:
        known = ", ".join(sorted(Settings.model_fields))
        raise SettingsError(
            "invalid configuration:\n" + "\n".join(f"  {n}: unknown group (known: {known})" for n in unknown)
        )
    try:
        return Settings(_secrets_dir=_secrets_dir(), **overrides)  # type: ignore[call-arg]
    except ValidationError as e:
        raise SettingsError(_explain(e)) from None
    except ValueError as e:  # raised by a settings source (unreadable secret file, bad *_FILE name)
        raise SettingsError(f"invalid configuration:\n  {e}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, validated on first use. ``get_settings.cache_clear()`` in tests."""
    return load_settings()
