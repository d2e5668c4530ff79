"""``cancelable keys add|list|show|rotate``: the keys jobs are derived under, as a user manages them.

The local provider's keyring (``keys.keyring_path``, the local stack's ``.stack/keyring.json``) gets fresh random
32-byte keys from ``add`` (file mode 0600; running workers re-read it when it changes). Key material is never read
back, printed or returned: ``list`` and ``show`` give key IDs, creation times and, with ``--tenant``, the key's
state for that tenant. With the KMS provider the keys live in KMS; ``list`` and ``show`` give the
``keys.kms_key_map`` entries, and ``add`` is refused (KMS keys are provisioned in KMS and mapped in the settings).
``rotate`` is a whole-key revocation onto a new key (added to the keyring first when it is missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from producers.commands import EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_OK, CliError, run_job


def _keyring_path(client: Any) -> Any:
    return client.settings.keys.keyring_path


def _require_local(client: Any, what: str) -> None:
    if client.settings.keys.provider != "local":
        raise CliError(
            f"cancelable keys {what}: the keys.provider is {client.settings.keys.provider}; KMS keys are created in "
            "KMS (HMAC_256, GENERATE_VERIFY_MAC) and named in CANCELABLE_KEYS__KMS_KEY_MAP (docs/operations.md)",
            EXIT_BAD_INPUT,
        )


def _entries(client: Any) -> list[dict[str, str]]:
    """Key IDs with what is known of them (never material)."""
    from worker.errors import KeyProviderUnavailable
    from worker.keys.providers import keyring_entries

    k = client.settings.keys
    if k.provider == "kms":
        return [{"key_id": key_id, "kms_key": kms} for key_id, kms in sorted(k.kms_key_map.items())]
    try:
        return keyring_entries(k.keyring_path)
    except KeyProviderUnavailable as e:
        raise CliError(f"cancelable keys: {e}", EXIT_BAD_INPUT) from None


def _tenant_state(client: Any, tenant: str, key_id: str) -> dict[str, Any]:
    from worker.contracts import check_name
    from worker.keys.registry import KeyRegistry

    try:
        check_name(tenant, "tenant")
    except ValueError as e:
        raise CliError(f"cancelable keys: {e}") from None
    st = KeyRegistry(client.store).key_state(tenant, key_id)
    if st is None:
        return {"tenant": tenant, "state": "active"}
    return {"tenant": tenant, "state": st.state, "reason": st.reason, "job_id": st.job_id}


def add_keys(client: Any, args: argparse.Namespace) -> int:
    from worker.contracts import check_key_id
    from worker.keys.providers import write_keyring

    _require_local(client, "add")
    try:
        ids = [check_key_id(k) for k in args.key_ids]
    except ValueError as e:
        raise CliError(f"cancelable keys add: {e}") from None
    path = _keyring_path(client)
    added = set(write_keyring(path, ids))
    for k in ids:
        if k in added:
            print(f"added key {k} to {path} (32 random bytes; the file is mode 0600, the key is never printed)")
        else:
            print(f"key {k} is already in {path} (unchanged)")
    return EXIT_OK


def list_keys(client: Any, args: argparse.Namespace) -> int:
    rows = _entries(client)
    if args.tenant:
        for r in rows:
            r.update({k: v for k, v in _tenant_state(client, args.tenant, r["key_id"]).items() if k != "tenant"})
    if args.json:
        print(json.dumps({"provider": client.settings.keys.provider, "keys": rows}, indent=2, sort_keys=True))
        return EXIT_OK
    where = _keyring_path(client) if client.settings.keys.provider == "local" else "CANCELABLE_KEYS__KMS_KEY_MAP"
    if not rows:
        hint = "`cancelable keys add KEY_ID`" if client.settings.keys.provider == "local" else "the KMS key map"
        print(f"no keys in {where} (add one with {hint})")
        return EXIT_OK
    print(f"{client.settings.keys.provider} keys ({where}):")
    for r in rows:
        detail = f"created {r['created_at']}" if "created_at" in r else f"KMS key {r['kms_key']}"
        state = f"  {r['state']} for {args.tenant}" if "state" in r else ""
        print(f"  {r['key_id']}  {detail}{state}")
    return EXIT_OK


def show_key(client: Any, args: argparse.Namespace) -> int:
    rows = {r["key_id"]: r for r in _entries(client)}
    row = rows.get(args.key_id)
    if row is None and not (client.settings.keys.provider == "kms" and not client.settings.keys.kms_key_map):
        raise CliError(f"no key {args.key_id} (see `cancelable keys list`)", EXIT_NOT_FOUND)
    d: dict[str, Any] = {"provider": client.settings.keys.provider, **(row or {"key_id": args.key_id})}
    if args.tenant:
        d["tenant_state"] = _tenant_state(client, args.tenant, args.key_id)
    if args.json:
        print(json.dumps(d, indent=2, sort_keys=True))
        return EXIT_OK
    lines = [f"key {args.key_id}", f"  provider   {d['provider']}"]
    if "created_at" in d:
        lines.append(f"  created    {d['created_at'] or 'unknown'}")
    if "kms_key" in d:
        lines.append(f"  KMS key    {d['kms_key']}")
    if args.tenant:
        t = d["tenant_state"]
        extra = f" ({t['reason']}; job {t['job_id']})" if t["state"] == "revoked" else ""
        lines.append(f"  {args.tenant:<10} {t['state']}{extra}")
    print("\n".join(lines))
    return EXIT_OK


def rotate_key(client: Any, args: argparse.Namespace) -> int:
    """Revoke ``--key`` for the tenant and reissue its subjects under ``--new-key`` (default: the next key ID,
    added to the local keyring when missing)."""
    from worker.contracts import check_key_id
    from worker.keys.providers import next_key_id, write_keyring

    try:
        new = check_key_id(args.new_key_id) if args.new_key_id else next_key_id(args.key_id)
    except ValueError as e:
        raise CliError(f"cancelable keys rotate: {e}") from None
    if client.settings.keys.provider == "local":
        for k in write_keyring(_keyring_path(client), [new]):
            out = sys.stderr if args.json or args.no_wait else sys.stdout
            print(f"added key {k} to {_keyring_path(client)} (never printed)", file=out)
    elif not args.new_key_id:
        raise CliError("cancelable keys rotate: with KMS keys, give --new-key (a key of CANCELABLE_KEYS__KMS_KEY_MAP)")
    revoke = argparse.Namespace(**vars(args))
    revoke.command, revoke.subject, revoke.new_key_id, revoke.purge = "revoke", None, new, args.purge
    return run_job(client, revoke)
