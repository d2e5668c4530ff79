"""Wire contracts: jobs, results, status and error codes, refs and identifiers. Imports neither torch nor boto3."""

from worker.contracts.chunks import ChunkResult, ReenrollChunk
from worker.contracts.codes import ErrorCode, JobStatus
from worker.contracts.ids import (
    JobId,
    KeyId,
    SubjectId,
    TenantId,
    check_job_id,
    check_key_id,
    check_name,
    job_ref,
    key_id_path,
    parse_job_ref,
)
from worker.contracts.jobs import (
    DEFAULT_NAMING_RULE,
    MAX_IMAGES_PER_JOB,
    SCHEMA_VERSION,
    BulkJob,
    BulkManifest,
    EnrollJob,
    Job,
    RevokeJob,
    VerifyJob,
    child_job_id,
)
from worker.contracts.manifest import ManifestRow, ManifestRowError, iter_csv, iter_jsonl, iter_prefix
from worker.contracts.refs import S3Prefix, S3Ref, parse_s3_uri
from worker.contracts.results import BulkResult, EnrollResult, JobError, Result, RevokeResult, VerifyResult
from worker.contracts.wire import job_from_wire, result_from_wire, to_json, to_wire

__all__ = [
    "DEFAULT_NAMING_RULE",
    "MAX_IMAGES_PER_JOB",
    "SCHEMA_VERSION",
    "BulkJob",
    "BulkManifest",
    "BulkResult",
    "ChunkResult",
    "EnrollJob",
    "EnrollResult",
    "ErrorCode",
    "Job",
    "JobError",
    "JobId",
    "JobStatus",
    "KeyId",
    "ManifestRow",
    "ManifestRowError",
    "ReenrollChunk",
    "Result",
    "RevokeJob",
    "RevokeResult",
    "S3Prefix",
    "S3Ref",
    "SubjectId",
    "TenantId",
    "VerifyJob",
    "VerifyResult",
    "check_job_id",
    "check_key_id",
    "check_name",
    "child_job_id",
    "iter_csv",
    "iter_jsonl",
    "iter_prefix",
    "job_ref",
    "job_from_wire",
    "key_id_path",
    "parse_job_ref",
    "parse_s3_uri",
    "result_from_wire",
    "to_json",
    "to_wire",
]
