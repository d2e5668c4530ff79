"""Seed derivation: exact layout (vectors computed independently here with hmac), domain separation, validation."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest

from worker.keys.derive import DEFAULT_PURPOSE, derivation_message, derive_seed, seed_from_mac

KEY = bytes(range(32))


def _expected_message(purpose: str, tenant: str, subject: str, version: str) -> bytes:
    out = b"CFDRV1"
    for text in (purpose, tenant, subject, version):
        raw = text.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return out


def test_message_layout_matches_an_independent_construction() -> None:
    msg = derivation_message("acme", "subject-42", 3)
    assert msg == _expected_message(DEFAULT_PURPOSE, "acme", "subject-42", "3")
    assert msg.startswith(b"CFDRV1\x00\x00\x00\x18faceanonymixer/v1/latent\x00\x00\x00\x04acme")


def test_seed_is_hmac_sha256_of_the_message() -> None:
    seed = derive_seed(KEY, "acme", "subject-42", 3)
    expected = hmac.new(KEY, _expected_message(DEFAULT_PURPOSE, "acme", "subject-42", "3"), hashlib.sha256).digest()
    assert seed == expected
    assert len(seed) == 32
    # the KMS path: MAC of derivation_message computed elsewhere gives the same seed
    assert seed_from_mac(KEY, derivation_message("acme", "subject-42", 3)) == seed


def test_unicode_fields_are_length_prefixed_in_bytes_not_characters() -> None:
    msg = derivation_message("t\u00e9nant", "\u5f20\u4e09", 0)
    assert msg == _expected_message(DEFAULT_PURPOSE, "t\u00e9nant", "\u5f20\u4e09", "0")


@pytest.mark.parametrize(
    "args",
    [
        (KEY[::-1], "acme", "subject-42", 3),  # other key
        (KEY, "acme2", "subject-42", 3),  # other tenant
        (KEY, "acme", "subject-43", 3),  # other subject
        (KEY, "acme", "subject-42", 4),  # other version
        (KEY, "acmes", "ubject-42", 3),  # same concatenation, other split
        (KEY, "acme", "subject-423", 3),
    ],
)
def test_any_change_gives_an_unrelated_seed(args: tuple) -> None:
    base = derive_seed(KEY, "acme", "subject-42", 3)
    other = derive_seed(*args)
    assert other != base
    differing_bits = sum(bin(a ^ b).count("1") for a, b in zip(base, other, strict=True))
    assert 64 < differing_bits < 192  # ~128 of 256 bits expected for unrelated outputs


def test_purpose_separates_domains() -> None:
    assert derive_seed(KEY, "a", "s", 1) != derive_seed(KEY, "a", "s", 1, purpose="other/v1")


def test_int_and_decimal_string_versions_are_the_same_version() -> None:
    assert derive_seed(KEY, "a", "s", 7) == derive_seed(KEY, "a", "s", "7") == derive_seed(KEY, "a", "s", "07")


@pytest.mark.parametrize(
    "tenant,subject,version",
    [("", "s", 1), ("a", "", 1), ("a", "s", -1), ("a", "s", True), ("a", "s", "v1"), ("a", "s", 1.0), (1, "s", 1)],
)
def test_invalid_fields_are_rejected(tenant: object, subject: object, version: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        derive_seed(KEY, tenant, subject, version)  # type: ignore[arg-type]


def test_short_or_non_bytes_key_is_rejected_without_echoing_it() -> None:
    with pytest.raises(ValueError) as info:
        derive_seed(b"short-secret", "a", "s", 1)
    assert "short-secret" not in str(info.value)
    with pytest.raises(TypeError):
        derive_seed("not-bytes-not-bytes", "a", "s", 1)  # type: ignore[arg-type]
