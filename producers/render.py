"""Human-readable one-screen summaries of results, job status and subject state (what the CLI prints)."""

from __future__ import annotations

from typing import Any


def as_dict(res: Any) -> dict[str, Any]:
    return res if isinstance(res, dict) else res.model_dump(mode="json")


def _message(err: dict[str, Any], local_names: dict[str, str] | None) -> str:
    """The error message, with the ``s3://`` reference of each photo the CLI uploaded replaced by the user's own
    file name (the worker only knows the upload)."""
    text = str(err["message"])
    for uri, name in (local_names or {}).items():
        text = text.replace(uri, name)
    return text


def _error(d: dict[str, Any], local_names: dict[str, str] | None = None) -> str:
    err = d["error"]
    text = f" ({err['code']}: {_message(err, local_names)})"
    if err["code"] == "no_template" and d.get("subject"):
        text += (
            f"\n  nothing is enrolled for {d['tenant']}/{d['subject']}; "
            f"see `cancelable subject --tenant {d['tenant']} --subject {d['subject']}`"
        )
    return text


def result_summary(res: Any, local_names: dict[str, str] | None = None) -> str:
    """A job result (model or wire dict) -> a few lines. ``local_names``: uploaded ``s3://`` reference -> the local
    file it came from, used in error messages."""
    d = as_dict(res)
    kind, status = d.get("kind"), d.get("status")
    head = f"{kind} {d.get('job_id')}: {status}"
    if d.get("error") and kind not in ("bulk", "revoke"):
        return head + _error(d, local_names)
    if kind == "revoke" and d.get("error") and not d.get("subjects_done"):
        return head + _error(d)  # nothing was reissued: no version numbers to show
    if d.get("error"):
        head += f" ({d['error']['code']}: {d['error']['message']})"
    if kind == "enroll":
        return (  # the manifest is the committed version; the artefacts it lists are in --json
            f"{head}; version {d['version']} of {d['tenant']}/{d['subject']} (key {d['key_id']} v{d['key_version']}"
            f"{', existing' if d.get('created') is False else ''})\n  manifest {d['manifest_uri']}\n"
            "  (the committed version: lists the template and "
            f"{_count(len(d.get('image_uris', [])), 'cancelable image')})"
        )
    if kind == "verify":
        return (
            f"{head}; score {d['score']:.4f} vs threshold {d['threshold']:.4f}{_far(d)} -> {d['decision'].upper()} "
            f"(template version {d['version']}, key {d['key_id']} v{d['key_version']})"
        )
    if kind == "revoke":
        extra = ""
        if d.get("subject") and d.get("new_version") is not None:
            extra = (
                f"; revoked versions {d.get('revoked_versions')} -> new version {d.get('new_version')} "
                f"(key {d.get('new_key_id')} v{d.get('new_key_version')})\n  manifest {d.get('manifest_uri')}"
            )
        if d.get("subjects_fenced"):
            extra += f"; {d['subjects_fenced']} not yet enrolled moved to key {d.get('new_key_id')} (fenced)"
        return (
            f"{head}; subjects {d['subjects_done']}/{d['subjects_total']} reissued, {d['subjects_failed']} failed"
            + extra
        )
    if kind == "erase":
        what = f"every subject of tenant {d['tenant']}" if d.get("all_subjects") else "the subject"
        if not d.get("all_subjects") and not d.get("subjects_erased"):
            what = "nothing was stored for the subject; erasure recorded"
        return (
            f"{head}; {what}: {d['subjects_erased']} subjects, {d['objects_deleted']} objects and "
            f"{d['redis_keys_deleted']} job records deleted\n  record {d.get('record_uri')}"
        )
    if kind == "bulk":
        return f"{head}; {d['succeeded']} succeeded, {d['failed']} failed of {d['total']}" + (
            f"; errors {d['errors_by_code']}" if d.get("errors_by_code") else ""
        )
    return head


def status_summary(job_id: str, st: dict[str, Any]) -> str:
    """``Client.status`` output -> lines."""
    lines = [f"job {job_id}: {st['state']} (attempts {st['attempts']})"]
    p = st.get("progress")
    if p and p.get("kind") in ("bulk", "revoke"):
        if p["total"] is None:
            lines.append(
                f"  {p['kind']}: listing (total not known yet), succeeded {p['succeeded']}, failed {p['failed']}"
            )
        else:
            lines.append(
                f"  {p['kind']}: total {p['total']}, succeeded {p['succeeded']}, failed {p['failed']}, "
                f"pending {p['pending']}"
            )
        lines += [f"    failed {code}: {n}" for code, n in sorted(p["failed_codes"].items())]
    if "dead_letter" in st:
        lines.append(f"  dead-lettered: {st['dead_letter']}")
    if "result" in st:
        lines.append("  " + result_summary(st["result"]).replace("\n", "\n  "))
    return "\n".join(lines)


def subject_summary(s: dict[str, Any]) -> str:
    """``SubjectState.as_dict()`` -> lines."""
    lines = [f"subject {s['tenant']}/{s['subject']}"]
    if s["current_version"] is None:
        lines.append("  current version  none (nothing committed yet)")
    else:
        lines.append(
            f"  current version  {s['current_version']} (key {s['current_key_id']} v{s['current_key_version']}, "
            f"committed {s['current_committed_at']})"
        )
        lines.append(f"  manifest         {s['current_manifest_uri']}")
    if s["key_id"] is not None:
        lines.append(
            f"  key version      {s['key_id']} v{s['key_version']}" + (" (key revoked)" if s["key_revoked"] else "")
        )
    lines.append(f"  versions         {', '.join(map(str, s['versions'])) or 'none'}")
    if not s["revoked"]:
        lines.append("  revoked versions none")
    else:
        lines.append(f"  revoked versions {', '.join(str(r['version']) for r in s['revoked'])}")
        for r in s["revoked"]:
            by = f", replaced by {r['replaced_by']}" if r["replaced_by"] is not None else ""
            purged = ", images purged" if r["images_purged"] else ""
            lines.append(
                f"    version {r['version']} (key {r['key_id']} v{r['key_version']}) revoked {r['revoked_at']}{by}"
                f"{purged}: {r['reason']}"
            )
    return "\n".join(lines)


def _far(d: dict[str, Any]) -> str:
    """' (FAR 0.1 %, 1 photo)': the false-accept rate the threshold stands for, when the bundle is calibrated."""
    size = d.get("enrolment_size")
    photos = f", {size} photo{'s' if size != 1 else ''}" if size else ""
    if d.get("far") is None:
        return f" (FAR not calibrated{photos})" if size else ""
    if d["far"] == 0 and d.get("far_ci95"):
        return f" (FAR < {100 * d['far_ci95'][1]:.2g} %{photos})"  # none of the calibration's impostors passed
    return f" (FAR {100 * d['far']:.2g} %{photos})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
