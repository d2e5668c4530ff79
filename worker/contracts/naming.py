"""Naming rules of prefix manifests: a user-supplied regex, compiled by RE2 (``google-re2``), never by ``re``.

RE2 matches in time linear in the key's length, whatever the rule: there is no backtracking, so a rule such as
``^(?P<subject>([0-9a-f]+)+)x`` costs the same microseconds per key as a plain one. What RE2 cannot do in linear
time it refuses at compile time (backreferences ``\\1``, lookaround ``(?=...)``, possessive quantifiers), so such a
rule is a bad-input error before anything is queued. Per rule the cost is bounded too: at most
``MAX_RULE_CHARS`` characters, a compiled program of at most ``MAX_PROGRAM_SIZE`` instructions and ``MAX_MEM`` bytes
of RE2 memory; with S3 keys of at most 1,024 bytes every match is bounded by a constant (well under a millisecond).
"""

from __future__ import annotations

from typing import Any

MAX_RULE_CHARS = 512
MAX_PROGRAM_SIZE = 5_000
MAX_MEM = 4 << 20  # bytes of RE2 memory for one compiled rule (its DFA cache included)


def compile_rule(rule: str) -> Any:
    """``rule`` -> a compiled RE2 pattern (``.match(key)``, ``.groupindex``); ``ValueError`` with a one-line reason
    when it is too long, not valid RE2 syntax, too large once compiled, or has no ``(?P<subject>...)`` group."""
    import re2

    if not isinstance(rule, str) or not rule:
        raise ValueError("naming_rule must be a non-empty string")
    if len(rule) > MAX_RULE_CHARS:
        raise ValueError(f"naming_rule is longer than {MAX_RULE_CHARS} characters")
    opts = re2.Options()
    opts.max_mem = MAX_MEM
    opts.log_errors = False
    try:
        rx = re2.compile(rule, opts)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(
            f"naming_rule is not a valid RE2 regex ({reason}; RE2 has no backreferences or lookaround)"
        ) from None
    if rx.programsize > MAX_PROGRAM_SIZE:
        raise ValueError(f"naming_rule is too large once compiled ({rx.programsize} > {MAX_PROGRAM_SIZE} instructions)")
    if "subject" not in rx.groupindex:
        raise ValueError("naming_rule needs a named group (?P<subject>...)")
    return rx
