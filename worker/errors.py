"""One flat hierarchy of named errors.

Every error the engine, storage, keys or tasks raise on purpose derives from ``CancelableError`` and carries a
stable ``code`` (one of ``worker.contracts.ErrorCode`` values). Messages never contain key material, seeds,
embeddings, image bytes or presigned URLs: only IDs, file names, shapes and counts.
"""

from __future__ import annotations


class CancelableError(Exception):
    """Base of every deliberate error. ``code`` is the wire error code; ``retryable`` marks transient faults."""

    code: str = "internal_error"
    retryable: bool = False


# --- input images -------------------------------------------------------------------------------------------------
class InvalidImageError(CancelableError):
    """Bytes that do not decode to an image (corrupt, truncated, empty, not an image)."""

    code = "invalid_image"


class ImageTooLargeError(CancelableError):
    """Image over the byte or pixel limit (decompression bombs included)."""

    code = "image_too_large"


class UnsupportedFormatError(CancelableError):
    code = "unsupported_format"


class NoFaceError(CancelableError):
    code = "no_face"


class MultipleFacesError(CancelableError):
    code = "multiple_faces"


class InvalidTensorError(CancelableError):
    """A tensor of the wrong shape, dtype or value range reached the engine."""

    code = "invalid_tensor"


# --- models and bundles -------------------------------------------------------------------------------------------
class BundleError(CancelableError):
    code = "bundle_error"


class UnknownComponentError(BundleError):
    code = "unknown_component"


class HashMismatchError(BundleError):
    code = "hash_mismatch"


class CheckpointLayoutError(BundleError):
    """A checkpoint whose key names or shapes do not match the declared public format."""

    code = "checkpoint_layout"


class MatcherMismatchError(BundleError):
    """A template scored by another matcher (recognizer + score) than the one this worker's bundle verifies with."""

    code = "matcher_mismatch"


class UncalibratedFarError(BundleError):
    """A verify asked for a false-accept rate the bundle holds no calibrated threshold for."""

    code = "uncalibrated_far"


# --- keys -----------------------------------------------------------------------------------------------------------
class KeyError_(CancelableError):
    code = "key_error"


class UnknownKeyError(KeyError_):
    code = "unknown_key"


class RevokedKeyError(KeyError_):
    code = "revoked_key"


class KeyProviderUnavailable(KeyError_):
    code = "key_provider_unavailable"
    retryable = True


# --- storage ----------------------------------------------------------------------------------------------------------
class StorageError(CancelableError):
    code = "storage_error"
    retryable = True


class ForbiddenInputError(StorageError):
    """An input reference outside the tenant's allowed buckets/prefixes (checked before any download)."""

    code = "forbidden_input"
    retryable = False


class InvalidInputError(StorageError):
    """S3 refused a request for good (HTTP 4xx other than throttling and timeouts): a key S3 cannot take, an object
    the worker may not read (access denied, encrypted with a customer-provided key). Retrying cannot help."""

    code = "invalid_input"
    retryable = False


class ObjectNotFoundError(StorageError):
    code = "object_not_found"
    retryable = False


class VersionConflictError(StorageError):
    """A conditional write lost a race (another writer committed first)."""

    code = "version_conflict"


class StaleKeyError(VersionConflictError):
    """The subject's key was revoked after this job derived its seed: the commit was fenced off (nothing of it is
    current or unmarked); the job re-derives under the new key version."""

    code = "stale_key"


class ErasedError(StorageError):
    """The subject was erased while this job ran (its writes were deleted again), or an erasure of it is still in
    progress. Nothing of the job was kept; a new enrolment after the erasure finished is allowed."""

    code = "erased"
    retryable = False


class NoTemplateError(StorageError):
    """Verify or revoke for a subject that has no committed template."""

    code = "no_template"
    retryable = False


# --- jobs -----------------------------------------------------------------------------------------------------------
class MalformedJobError(CancelableError):
    code = "malformed_job"


class DeadLetteredError(CancelableError):
    code = "dead_lettered"
