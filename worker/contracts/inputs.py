"""Which source images and bulk manifests a tenant's job may read: an allow-list of S3 prefixes per tenant, checked
before any S3 request (one check for both: ``InputPolicy.check``).

Default for every tenant: its own input prefix ``s3://{input_bucket}/tenants/{tenant}/``. Settings may add entries
per tenant (``s3.input_allow``: tenant -> list of ``s3://bucket/prefix/``; the key ``"*"`` applies to every tenant;
``{tenant}`` in an entry is replaced by the tenant ID). The output bucket (templates, cancelable images, key state)
is never a valid input, whatever the list says: a job must not read another tenant's stored cancelable images.
The check runs before any request to S3, so a refused reference reveals nothing about which objects exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from worker.contracts.ids import check_name
from worker.contracts.refs import S3Prefix, S3Ref
from worker.errors import ForbiddenInputError

DEFAULT_ENTRY = "s3://{input_bucket}/tenants/{tenant}/"


@dataclass(frozen=True)
class InputPolicy:
    output_bucket: str
    input_bucket: str
    allow: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tenant, entries in self.allow.items():
            if tenant != "*":
                check_name(tenant, "tenant")
            for entry in entries:
                self._prefix(entry, "t")  # validates the entry once, at start-up

    @classmethod
    def from_settings(cls, s3: object) -> InputPolicy:
        """From ``worker.settings.S3Settings`` (``bucket``, ``input_bucket``, ``input_allow``)."""
        bucket = str(getattr(s3, "bucket"))  # noqa: B009
        return cls(bucket, getattr(s3, "input_bucket", None) or f"{bucket}-inputs", getattr(s3, "input_allow", {}))

    def _prefix(self, entry: str, tenant: str) -> S3Prefix:
        text = entry.replace("{tenant}", tenant).replace("{input_bucket}", self.input_bucket)
        p = S3Prefix.model_validate(text)
        if p.bucket == self.output_bucket:
            raise ValueError(f"input allow-list entry {entry!r} names the output bucket; it is never a valid input")
        if p.prefix and not p.prefix.endswith("/"):
            p = S3Prefix(bucket=p.bucket, prefix=p.prefix + "/")  # 'tenants/a' must not admit 'tenants/ab/...'
        return p

    def prefixes(self, tenant: str) -> list[S3Prefix]:
        """The prefixes ``tenant`` may read from, most specific (its own entries) first."""
        check_name(tenant, "tenant")
        entries = [*self.allow.get(tenant, ()), *self.allow.get("*", ())] or [DEFAULT_ENTRY]
        return [self._prefix(e, tenant) for e in entries]

    def allows(self, tenant: str, ref: S3Ref | S3Prefix) -> bool:
        """Whether ``tenant`` may read the object ``ref``, or (an ``S3Prefix``) list and read everything under it:
        the same rule for both, so a listing can never reach further than a single read could."""
        key = ref.key if isinstance(ref, S3Ref) else ref.prefix
        if ref.bucket == self.output_bucket:
            return False
        return any(ref.bucket == p.bucket and key.startswith(p.prefix) for p in self.prefixes(tenant))

    def check(self, tenant: str, ref: S3Ref | S3Prefix) -> None:
        """Raise ``ForbiddenInputError`` unless ``tenant`` may read ``ref`` (a source image, a CSV/JSONL manifest,
        or a prefix manifest's whole prefix). Call it before any S3 request about ``ref``."""
        if not self.allows(tenant, ref):
            raise ForbiddenInputError(f"{ref.uri} is outside the inputs allowed for tenant {tenant}")
