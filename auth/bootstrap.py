"""Offline set-up, before any daemon runs (the cluster launcher and tests use these).

Both hold the data directory's lock, so they refuse to run while an authority daemon serves
from the same directory (use the online `keyval principal add` then).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from auth import keys
from auth.datadir import AuthorityInfo, ensure_authority_dir, locked
from auth.principals import (
    Principal,
    PrincipalError,
    Registry,
    check_name,
    check_prefixes,
    check_role,
)


def init_authority(data_dir: Path) -> AuthorityInfo:
    """Create (or load) the authority's keys in `data_dir`; return its id and public key."""
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked(data_dir, purpose="initialise the authority offline"):
        return ensure_authority_dir(data_dir).info


def add_principal(
    data_dir: Path,
    name: str,
    role: str,
    key_out_path: Path,
    prefixes: Iterable[str] = (),
) -> None:
    """Generate a key pair, write the private key to `key_out_path` (0600) and register only
    the public key in the authority's registry in `data_dir`."""
    data_dir = Path(data_dir)
    checked_role = check_role(role)
    check_name(name)
    checked_prefixes = check_prefixes(checked_role, prefixes)
    with locked(data_dir, purpose=f"add principal {name!r} offline"):
        ensure_authority_dir(data_dir)
        registry = Registry(data_dir)
        if registry.get(name) is not None:
            raise PrincipalError(f"principal {name!r} already exists")
        key_out_path = Path(key_out_path)
        if key_out_path.exists():
            raise PrincipalError(f"{key_out_path} exists; refusing to overwrite a key file")
        private_key = keys.generate_private_key()
        principal = Principal(
            name=name,
            role=checked_role,
            public_key=keys.public_key_bytes(private_key),
            prefixes=checked_prefixes,
        )
        keys.save_private_key(key_out_path, private_key)
        registry.add(principal)


def list_principals(data_dir: Path) -> list[Principal]:
    with locked(Path(data_dir), purpose="list principals offline"):
        return Registry(Path(data_dir)).all()


def set_enabled(data_dir: Path, name: str, enabled: bool) -> None:
    with locked(Path(data_dir), purpose=f"change principal {name!r} offline"):
        Registry(Path(data_dir)).set_enabled(name, enabled)


def rotate_principal(data_dir: Path, name: str, key_out_path: Path) -> None:
    """Give `name` a new key pair: the private key replaces `key_out_path` (0600)."""
    with locked(Path(data_dir), purpose=f"rotate principal {name!r} offline"):
        registry = Registry(Path(data_dir))
        registry.require(name)
        private_key = keys.generate_private_key()
        registry.set_public_key(name, keys.public_key_bytes(private_key))
        keys.save_private_key(Path(key_out_path), private_key)
