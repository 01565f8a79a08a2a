"""principals / principal add / principal disable against a real authority on loopback TCP."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from auth import bootstrap
from auth.client import Credentials
from auth.daemon import run_authority
from keyval.admin.actions import execute
from keyval.admin.errors import AdminError
from keyval.admin.grammar import parse_line
from keyval.admin.remote import AdminRemote
from keyval.admin.results import DoneResult, PrincipalsResult
from keyval.client.config import ClientSettings, Endpoint
from keyval.client.links import TicketDialer
from wire.errors import Unauthorized


async def start_authority(nursery: trio.Nursery, tmp_path: Path) -> tuple[str, str]:
    data = tmp_path / "auth"
    info = bootstrap.init_authority(data)
    bootstrap.add_principal(data, "admin", "admin", tmp_path / "admin.key")
    bootstrap.add_principal(data, "app", "client", tmp_path / "app.key", prefixes=["app/"])
    address = await nursery.start(run_authority, data, "127.0.0.1:0")
    return address, info.public_key_hex


def remote_as(name: str, tmp_path: Path, address: str, public_key_hex: str) -> AdminRemote:
    credentials = Credentials(name, tmp_path / f"{name}.key", address, public_key_hex)
    settings = ClientSettings(commanders=(Endpoint("commander-1", "127.0.0.1:1"),))
    return AdminRemote(settings, TicketDialer(credentials), credentials=credentials)


async def run(remote: AdminRemote, line: str) -> object:
    invocation = parse_line(line)
    assert invocation is not None
    return await execute(invocation, remote, lambda text: None)


async def test_list_add_disable(nursery: trio.Nursery, tmp_path: Path) -> None:
    address, public_key = await start_authority(nursery, tmp_path)
    remote = remote_as("admin", tmp_path, address, public_key)
    listed = await run(remote, "principals")
    assert isinstance(listed, PrincipalsResult)
    assert [(p.name, p.role, p.enabled) for p in listed.principals] == [
        ("admin", "admin", True),
        ("app", "client", True),
    ]
    assert listed.principals[1].prefixes == ("app/",)

    out = tmp_path / "ops.key"
    added = await run(remote, f"principal add ops --role admin --out {out}")
    assert isinstance(added, DoneResult) and added.data["key_file"] == str(out)
    assert out.stat().st_mode & 0o777 == 0o600
    # The new principal logs in with the key the command wrote.
    ops = remote_as("ops", tmp_path, address, public_key)
    assert isinstance(await run(ops, "principals"), PrincipalsResult)

    with pytest.raises(AdminError, match="exists; refusing to overwrite"):
        await run(remote, f"principal add other --role client --out {out}")

    disabled = await run(remote, "principal disable app")
    assert isinstance(disabled, DoneResult) and disabled.data == {"name": "app", "enabled": False}
    listed = await run(remote, "principals")
    assert isinstance(listed, PrincipalsResult)
    assert {p.name: p.enabled for p in listed.principals}["app"] is False
    await remote.aclose()
    await ops.aclose()


async def test_a_client_principal_is_unauthorized(nursery: trio.Nursery, tmp_path: Path) -> None:
    address, public_key = await start_authority(nursery, tmp_path)
    remote = remote_as("app", tmp_path, address, public_key)
    with pytest.raises(Unauthorized):
        await run(remote, "principals")
    with pytest.raises(Unauthorized):
        await run(remote, f"principal add x --role client --out {tmp_path / 'x.key'}")
    assert not (tmp_path / "x.key").exists()  # no key file for a principal never added
    await remote.aclose()
