"""The authority's data directory: its own keys, its identity, and a lock.

    DIR/authority.key     Ed25519 signing key (PEM, 0600): signs handshake transcripts
    DIR/ticket-master.key 32 random bytes (0600): every ticket key is derived from it
    DIR/authority.json    {"id": ..., "public_key": hex}: what clients pin
    DIR/principals.json   the registry (auth.principals): public keys only
    DIR/lock              held (flock) by the running daemon or an offline edit

Created on first use. No principal's private key is ever written here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth import keys
from auth.tickets import MASTER_KEY_BYTES, new_master_key

SIGNING_KEY_FILE = "authority.key"
MASTER_KEY_FILE = "ticket-master.key"
IDENTITY_FILE = "authority.json"
LOCK_FILE = "lock"
DIRECTORY_MODE = 0o700
ID_HEX_CHARS = 16  # 64 bits of the public key's hash: names the authority, not a secret


class AuthorityDirError(Exception):
    """The data directory is missing, damaged, or in use by another process."""


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorityInfo:
    """What a client needs to trust an authority: its id and Ed25519 public key (hex)."""

    id: str
    public_key_hex: str


@dataclasses.dataclass(frozen=True, slots=True)
class AuthorityKeys:
    info: AuthorityInfo
    signing_key: Ed25519PrivateKey
    master_key: bytes


def authority_id_for(public_key: bytes) -> str:
    return "auth-" + hashlib.sha256(public_key).hexdigest()[:ID_HEX_CHARS]


def ensure_authority_dir(directory: Path) -> AuthorityKeys:
    """Load the authority's keys from `directory`, creating the directory and keys if new."""
    directory = Path(directory)
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    signing_path = directory / SIGNING_KEY_FILE
    master_path = directory / MASTER_KEY_FILE
    identity_path = directory / IDENTITY_FILE
    if not signing_path.exists():
        if master_path.exists() or identity_path.exists():
            raise AuthorityDirError(
                f"{directory} has authority files but no {SIGNING_KEY_FILE}; restore it from "
                "backup (a new key would break every client's pinned public key)"
            )
        signing_key = keys.generate_private_key()
        keys.save_private_key(signing_path, signing_key)
        keys.write_private_file(master_path, new_master_key())
        public = keys.public_key_bytes(signing_key)
        info = AuthorityInfo(authority_id_for(public), public.hex())
        identity = {"id": info.id, "public_key": info.public_key_hex}
        keys.write_private_file(identity_path, (json.dumps(identity) + "\n").encode())
        os.chmod(identity_path, 0o644)  # public: clients and launchers read it
    return load_authority_dir(directory)


def load_authority_dir(directory: Path) -> AuthorityKeys:
    directory = Path(directory)
    try:
        signing_key = keys.load_private_key(directory / SIGNING_KEY_FILE)
        master_key = keys.read_private_file(directory / MASTER_KEY_FILE)
    except keys.KeyFileError as error:
        raise AuthorityDirError(str(error)) from None
    if len(master_key) != MASTER_KEY_BYTES:
        raise AuthorityDirError(f"{directory / MASTER_KEY_FILE} is damaged (wrong length)")
    public = keys.public_key_bytes(signing_key)
    info = AuthorityInfo(authority_id_for(public), public.hex())
    return AuthorityKeys(info=info, signing_key=signing_key, master_key=master_key)


@contextlib.contextmanager
def locked(directory: Path, *, purpose: str) -> Iterator[None]:
    """Hold the directory's lock; fail at once (naming `purpose`) if someone else holds it."""
    path = Path(directory) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuthorityDirError(
                f"{directory} is in use (an authority daemon is running on it?); cannot "
                f"{purpose}. Use the online command (through the daemon) instead, or stop it."
            ) from None
        yield
    finally:
        os.close(descriptor)  # closing releases the flock
