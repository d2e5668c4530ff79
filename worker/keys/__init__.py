"""Keys: ``derive`` (pure seed derivation, engine-owned) and ``providers`` (where key material lives).

``providers`` imports boto3 only inside ``KmsHmacProvider``; importing this package never needs it.
"""

from worker.keys.providers import (
    KeyProvider,
    KeyRegistry,
    KmsHmacProvider,
    LocalKeyring,
    make_key_provider,
    write_keyring,
)

__all__ = ["KeyProvider", "KeyRegistry", "KmsHmacProvider", "LocalKeyring", "make_key_provider", "write_keyring"]
