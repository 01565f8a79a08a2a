"""Principals and the authority's durable registry of them.

A principal is a name, a role, an Ed25519 public key, an enabled flag and, for clients, optional
key prefixes it may touch. The registry holds public keys only: it never sees a private key.
It is one JSON file, rewritten atomically (temp file, fsync, rename) on every change.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from auth.keys import PUBLIC_KEY_BYTES, write_private_file


class Role(enum.StrEnum):
    CLIENT = "client"
    DRONE = "drone"
    COMMANDER = "commander"
    DB = "db"
    ADMIN = "admin"


# Roles a service ticket may be issued for: the daemons that accept client connections.
SERVICE_ROLES = frozenset({Role.DRONE, Role.COMMANDER, Role.DB})

# Names appear in tickets, logs, file names and error messages: keep them plain and short.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# "auth" is what the authority calls itself as a ticket target (its TGTs are sealed for it).
RESERVED_NAMES = frozenset({"auth"})
MAX_PREFIXES = 64  # permission lists are checked per request; keep them short
MAX_PREFIX_CHARS = 256
REGISTRY_FILE = "principals.json"
REGISTRY_FORMAT = 1


class PrincipalError(ValueError):
    """A principal or registry operation is invalid (bad name, duplicate, unknown, ...)."""


class UnknownPrincipal(PrincipalError):
    pass


def check_name(name: str) -> str:
    if type(name) is not str or NAME_PATTERN.fullmatch(name) is None:
        raise PrincipalError(
            f"principal name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise PrincipalError(f"role {role!r} is not one of: {allowed}") from None


def check_prefixes(role: Role, prefixes: Iterable[str]) -> tuple[str, ...]:
    result = tuple(prefixes)
    if result and role is not Role.CLIENT:
        raise PrincipalError(f"key-prefix permissions apply to clients only, not {role.value}")
    if len(result) > MAX_PREFIXES:
        raise PrincipalError(f"at most {MAX_PREFIXES} key prefixes per principal")
    for prefix in result:
        if type(prefix) is not str or not 0 < len(prefix) <= MAX_PREFIX_CHARS:
            raise PrincipalError(f"a key prefix is 1-{MAX_PREFIX_CHARS} characters: {prefix!r}")
    return result


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: Role
    public_key: bytes  # raw Ed25519, 32 bytes
    enabled: bool = True
    prefixes: tuple[str, ...] = ()  # clients only; empty means every key

    def __post_init__(self) -> None:
        check_name(self.name)
        object.__setattr__(self, "role", check_role(self.role))
        if type(self.public_key) is not bytes or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise PrincipalError(f"public key of {self.name!r} must be {PUBLIC_KEY_BYTES} bytes")
        object.__setattr__(self, "prefixes", check_prefixes(self.role, self.prefixes))

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role.value,
            "public_key": self.public_key.hex(),
            "enabled": self.enabled,
            "prefixes": list(self.prefixes),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Principal:
        prefixes = data.get("prefixes", [])
        try:
            if not isinstance(prefixes, list):
                raise ValueError("prefixes must be a list")
            return cls(
                name=str(data["name"]),
                role=check_role(str(data["role"])),
                public_key=bytes.fromhex(str(data["public_key"])),
                enabled=data["enabled"] is True,
                prefixes=tuple(str(p) for p in prefixes),
            )
        except (KeyError, ValueError) as error:
            raise PrincipalError(f"registry entry {data!r} is damaged: {error}") from None


class Registry:
    """Principals by name, persisted in `directory/principals.json` after every change."""

    def __init__(self, directory: Path) -> None:
        self._path = Path(directory) / REGISTRY_FILE
        self._principals: dict[str, Principal] = {}
        if self._path.exists():
            self._load()

    def _load(self) -> None:
        try:
            document = json.loads(self._path.read_text("utf-8"))
        except (OSError, ValueError) as error:
            raise PrincipalError(f"cannot read registry {self._path}: {error}") from None
        if document.get("format") != REGISTRY_FORMAT:
            raise PrincipalError(
                f"registry {self._path} has unknown format {document.get('format')}"
            )
        for entry in document["principals"]:
            principal = Principal.from_json(entry)
            self._principals[principal.name] = principal

    def _save(self) -> None:
        document = {
            "format": REGISTRY_FORMAT,
            "principals": [p.to_json() for p in sorted(self._principals.values(), key=_by_name)],
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_private_file(self._path, text.encode("utf-8"))
        _fsync_directory(self._path.parent)

    def get(self, name: str) -> Principal | None:
        return self._principals.get(name)

    def require(self, name: str) -> Principal:
        principal = self._principals.get(name)
        if principal is None:
            raise UnknownPrincipal(f"no principal named {name!r}")
        return principal

    def all(self) -> list[Principal]:
        return sorted(self._principals.values(), key=_by_name)

    def disabled_names(self) -> list[str]:
        return sorted(p.name for p in self._principals.values() if not p.enabled)

    def add(self, principal: Principal) -> None:
        if principal.name in RESERVED_NAMES:
            raise PrincipalError(f"the name {principal.name!r} is reserved for the authority")
        if principal.name in self._principals:
            raise PrincipalError(f"principal {principal.name!r} already exists")
        self._principals[principal.name] = principal
        self._save()

    def set_enabled(self, name: str, enabled: bool) -> Principal:
        updated = dataclasses.replace(self.require(name), enabled=enabled)
        self._principals[name] = updated
        self._save()
        return updated

    def set_public_key(self, name: str, public_key: bytes) -> Principal:
        updated = dataclasses.replace(self.require(name), public_key=public_key)
        self._principals[name] = updated
        self._save()
        return updated


def _by_name(principal: Principal) -> str:
    return principal.name


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
