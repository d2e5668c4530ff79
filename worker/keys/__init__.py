"""Keys: ``derive`` (pure seed derivation, engine-owned), ``providers`` (where key material lives) and ``registry``
(key state and subject key versions in S3).

``providers`` imports boto3 only inside ``KmsHmacProvider``; importing this package never needs it.
"""

from worker.keys.providers import (
    KeyProvider,
    KmsHmacProvider,
    LocalKeyring,
    make_key_provider,
    write_keyring,
)
from worker.keys.registry import KeyRegistry

__all__ = ["KeyProvider", "KeyRegistry", "KmsHmacProvider", "LocalKeyring", "make_key_provider", "write_keyring"]
