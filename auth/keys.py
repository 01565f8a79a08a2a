"""Ed25519 key files and raw secret files, written with mode 0600.

A principal's private key is a PKCS#8 PEM file. Loading refuses a file that group or others
can read (like ssh does), so a key copied carelessly is noticed before it is used.
Secrets (the authority's ticket master key) are raw bytes in a file of the same mode.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_FILE_MODE = 0o600  # owner read/write only
# Bits that must be clear on a private file: anything for group or others.
_GROUP_OTHER_BITS = stat.S_IRWXG | stat.S_IRWXO
PUBLIC_KEY_BYTES = 32  # raw Ed25519 public key (RFC 8032)
MAX_KEY_FILE_BYTES = 16 * 1024  # a PEM Ed25519 key is ~120 bytes; refuse anything absurd


class KeyFileError(Exception):
    """A key file is missing, unreadable, too open, or not the expected kind of key."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if type(raw) is not bytes or len(raw) != PUBLIC_KEY_BYTES:
        raise KeyFileError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"public key {text!r} is not hex") from None
    return public_key_from_bytes(raw)


def write_private_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (never briefly world-readable)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, PRIVATE_FILE_MODE)
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)  # O_CREAT's mode is filtered by the umask
        with os.fdopen(descriptor, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def read_private_file(path: Path) -> bytes:
    """Read a 0600 file; refuse one that group or others may read or that is absurdly large."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if info.st_mode & _GROUP_OTHER_BITS:
        raise KeyFileError(
            f"key file {path} has mode {stat.S_IMODE(info.st_mode):o}; "
            f"run `chmod 600 {path}` (group and others must not read a private key)"
        )
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is {info.st_size} bytes; not a key")
    return path.read_bytes()


def save_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = read_private_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key: {error}"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
