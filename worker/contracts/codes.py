"""Closed sets on the wire: job status and error codes. ``ErrorCode`` values equal the ``code`` attributes of the
classes in ``worker.errors`` (a unit test checks the two sets are identical)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD_LETTERED)


class ErrorCode(StrEnum):
    INTERNAL_ERROR = "internal_error"
    # input images
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    NO_FACE = "no_face"
    MULTIPLE_FACES = "multiple_faces"
    INVALID_TENSOR = "invalid_tensor"
    # models and bundles
    BUNDLE_ERROR = "bundle_error"
    UNKNOWN_COMPONENT = "unknown_component"
    HASH_MISMATCH = "hash_mismatch"
    CHECKPOINT_LAYOUT = "checkpoint_layout"
    MATCHER_MISMATCH = "matcher_mismatch"
    UNCALIBRATED_FAR = "uncalibrated_far"
    # keys
    KEY_ERROR = "key_error"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    KEY_PROVIDER_UNAVAILABLE = "key_provider_unavailable"
    # storage
    STORAGE_ERROR = "storage_error"
    OBJECT_NOT_FOUND = "object_not_found"
    VERSION_CONFLICT = "version_conflict"
    STALE_KEY = "stale_key"
    FORBIDDEN_INPUT = "forbidden_input"
    INVALID_INPUT = "invalid_input"
    NO_TEMPLATE = "no_template"
    ERASED = "erased"
    # jobs
    MALFORMED_JOB = "malformed_job"
    DEAD_LETTERED = "dead_lettered"
