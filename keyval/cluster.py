"""`keyval cluster up`: a whole local cluster on loopback, on embedded defaults.

It creates (or, on a second run, reuses) under DIR: the authority's data (`auth/`), every
principal's private key (`keys/`), one TOML file per node (`nodes/`), the db's SQLite file
(`db/`), and starts, in this order, the authority, the db, the commanders and the drones as
child processes (`python -m keyval ...`), each writing its bound address to `run/NAME.addr`.
Once every drone serves, it writes `client.toml` and `nodes.json`, prints
`keyval cluster ready`, and supervises until Ctrl-C or SIGTERM, which stop all of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from keyval.processes import stop_processes

DEFAULT_BASE_PORT = 6230  # authority; db = +1; commanders = +2..+9; drones = +10..
DRONE_PORT_OFFSET = 10
MAX_COMMANDERS = 8  # ports base+2 .. base+9
MAX_DRONES = 60  # ports base+10 .. base+69
START_TIMEOUT_S = 60.0  # one daemon's start-up, including its first login
READY_TIMEOUT_S = 90.0  # the whole cluster serving every slot
STOP_GRACE_S = 5.0  # SIGTERM to SIGKILL


class ClusterError(Exception):
    """The cluster could not be started; the message says what to do."""


@dataclass
class Node:
    role: str
    name: str
    argv: list[str]
    ready_file: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = ""


def register(subparsers: Any) -> None:
    cluster = subparsers.add_parser("cluster", help="run a local cluster")
    actions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    up = actions.add_parser(
        "up",
        help="start a local cluster in the foreground (Ctrl-C stops it)",
        description="Start an authority, a db, commanders and drones on loopback. Prints "
        "'keyval cluster ready' once every slot is served; writes DIR/client.toml and "
        "DIR/nodes.json. Run again on the same DIR to resume with its data.",
    )
    up.add_argument("--dir", required=True, help="folder for keys, data, configs and logs")
    up.add_argument("--drones", type=int, default=3, help="number of drones (default 3)")
    up.add_argument("--commanders", type=int, default=1, help="number of commanders (default 1)")
    up.add_argument(
        "--backend",
        default=None,
        help="db backend URL (default: SQLite in DIR/db; or postgresql://...)",
    )
    up.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_BASE_PORT,
        help=f"first port (default {DEFAULT_BASE_PORT}); 0 lets every daemon pick a free port",
    )
    up.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    up.set_defaults(func=cmd_up)
    add_drone = actions.add_parser(
        "add-drone",
        help="start one more drone into a running cluster",
        description="Register a new drone principal with the running authority (as the "
        "cluster's admin), start it against DIR's db and commanders, and add it to "
        "DIR/nodes.json. The commander moves it a fair share of the slots. `cluster up` "
        "stops it with the rest of the cluster.",
    )
    add_drone.add_argument("--dir", required=True, help="the folder of a running `cluster up`")
    add_drone.add_argument(
        "--listen", default=None, help="HOST:PORT for the drone (default: a free port)"
    )
    add_drone.set_defaults(func=cmd_add_drone)


def _port(base: int, offset: int) -> int:
    return 0 if base == 0 else base + offset


def _principal_roles(drones: int, commanders: int) -> list[tuple[str, str]]:
    names = [("db", "db"), ("client", "client"), ("admin", "admin")]
    names += [(f"commander-{i}", "commander") for i in range(1, commanders + 1)]
    names += [(f"drone-{i}", "drone") for i in range(1, drones + 1)]
    return names


def _ensure_identities(root: Path, drones: int, commanders: int) -> str:
    """Create the authority and any missing principal; return the authority's public key hex."""
    from auth import bootstrap

    info = bootstrap.init_authority(root / "auth")
    keys = root / "keys"
    keys.mkdir(mode=0o700, exist_ok=True)
    for name, role in _principal_roles(drones, commanders):
        key_file = keys / f"{name}.key"
        if not key_file.exists():
            bootstrap.add_principal(root / "auth", name, role, key_file)
    return str(info.public_key_hex)


def _write_toml(path: Path, values: dict[str, Any]) -> None:
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(json.dumps(str(v)) for v in value)}]")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    path.write_text("\n".join(lines) + "\n")


class Cluster:
    def __init__(self, args: argparse.Namespace) -> None:
        self.root = Path(args.dir).resolve()
        self.drones: int = args.drones
        self.commanders: int = args.commanders
        self.backend: str | None = args.backend
        self.base: int = args.base_port
        self.host: str = args.host
        self.nodes: list[Node] = []
        self.stopping = False
        if not 1 <= self.drones <= MAX_DRONES:
            raise ClusterError(f"--drones must be 1..{MAX_DRONES}")
        if not 1 <= self.commanders <= MAX_COMMANDERS:
            raise ClusterError(f"--commanders must be 1..{MAX_COMMANDERS}")

    # ---------------------------------------------------------------- set-up

    def prepare(self) -> None:
        for sub in ("nodes", "run", "logs", "db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "run").glob("*.addr"):
            stale.unlink()
        self.authority_key = _ensure_identities(self.root, self.drones, self.commanders)

    def _identity(self, name: str, listen: str) -> Path:
        path = self.root / "nodes" / f"{name}.toml"
        _write_toml(
            path,
            {
                "name": name,
                "key": str(self.root / "keys" / f"{name}.key"),
                "authority": self.authority_address,
                "authority_key": self.authority_key,
                "listen": listen,
                "ready_file": str(self.root / "run" / f"{name}.addr"),
            },
        )
        return path

    def _node(self, role: str, name: str, argv: list[str]) -> Node:
        return Node(
            role=role,
            name=name,
            argv=[sys.executable, "-m", "keyval", *argv],
            ready_file=self.root / "run" / f"{name}.addr",
            log_file=self.root / "logs" / f"{name}.log",
        )

    def _listen(self, offset: int) -> str:
        return f"{self.host}:{_port(self.base, offset)}"

    # ---------------------------------------------------------------- running

    def start(self, node: Node) -> str:
        log = node.log_file.open("ab")
        node.process = subprocess.Popen(
            node.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping:
            if node.ready_file.exists():
                node.address = node.ready_file.read_text().strip()
                if node.address:
                    return node.address
            if node.process.poll() is not None:
                tail = node.log_file.read_text(errors="replace").strip().splitlines()[-5:]
                raise ClusterError(
                    f"{node.name} exited with code {node.process.returncode}: "
                    + (" | ".join(tail) or f"see {node.log_file}")
                )
            time.sleep(0.05)
        if self.stopping:
            raise ClusterError(f"interrupted while {node.name} was starting")
        raise ClusterError(f"{node.name} did not start within {START_TIMEOUT_S:.0f} s")

    def start_all(self) -> None:
        auth_ready = self.root / "run" / "authority.addr"
        authority = Node(
            role="auth",
            name="authority",
            argv=[
                sys.executable,
                "-m",
                "keyval",
                "auth",
                "--data",
                str(self.root / "auth"),
                "--listen",
                self._listen(0),
                "--ready-file",
                str(auth_ready),
            ],
            ready_file=auth_ready,
            log_file=self.root / "logs" / "authority.log",
        )
        self.authority_address = self.start(authority)

        db_argv = ["db", "--config", str(self._identity("db", self._listen(1)))]
        db_argv += ["--data", str(self.root / "db")]
        if self.backend:
            db_argv += ["--backend", self.backend]
        db_address = self.start(self._node("db", "db", db_argv))

        commander_addresses = []
        for index in range(1, self.commanders + 1):
            name = f"commander-{index}"
            config = self._identity(name, self._listen(1 + index))
            argv = ["commander", "--config", str(config), "--db", db_address]
            argv += ["--data", str(self.root / name), "--expect-drones", str(self.drones)]
            commander_addresses.append(self.start(self._node("commander", name, argv)))
        self.commander_addresses = commander_addresses

        for index in range(1, self.drones + 1):
            name = f"drone-{index}"
            config = self._identity(name, self._listen(DRONE_PORT_OFFSET + index - 1))
            argv = ["drone", "--config", str(config), "--db", db_address]
            argv += ["--data", str(self.root / name)]
            for address in commander_addresses:
                argv += ["--commander", address]
            self.start(self._node("drone", name, argv))

    def write_client_files(self) -> Path:
        client_toml = self.root / "client.toml"
        _write_toml(
            client_toml,
            {
                "name": "client",
                "key": str(self.root / "keys" / "client.key"),
                "authority": self.authority_address,
                "authority_key": self.authority_key,
                "commanders": self.commander_addresses,
                "ack": "durable",
            },
        )
        admin_toml = self.root / "admin.toml"
        _write_toml(
            admin_toml,
            {
                "name": "admin",
                "key": str(self.root / "keys" / "admin.key"),
                "authority": self.authority_address,
                "authority_key": self.authority_key,
                "commanders": self.commander_addresses,
            },
        )
        nodes = [
            {
                "role": node.role,
                "name": node.name,
                "address": node.address,
                "pid": node.process.pid if node.process else None,
                "argv": node.argv,  # how to start this node again (tests, fault runs)
            }
            for node in self.nodes
        ]
        (self.root / "nodes.json").write_text(json.dumps(nodes, indent=2) + "\n")
        return client_toml

    def wait_serving(self, client_toml: Path) -> None:
        """Wait until every slot has an owner and every drone answers for one of its slots."""
        import trio

        deadline = time.monotonic() + READY_TIMEOUT_S
        last_error: Exception | None = None
        while time.monotonic() < deadline and not self.stopping:
            self.check_children()
            try:
                if trio.run(_cluster_serves, client_toml, self.drones):
                    return
            except Exception as error:  # any failure here means "not yet"; retried
                last_error = error
            time.sleep(0.2)
        raise ClusterError(f"cluster did not serve within {READY_TIMEOUT_S:.0f} s: {last_error}")

    def check_children(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise ClusterError(
                    f"{node.name} exited with code {node.process.returncode}; see {node.log_file}"
                )

    def stop(self) -> None:
        _stop_added_drones(self.root)
        running = [node.process for node in reversed(self.nodes) if node.process is not None]
        stop_processes(running, STOP_GRACE_S)

    def supervise(self) -> None:
        reported: set[str] = set()
        while not self.stopping:
            for node in self.nodes:
                if node.process is None or node.name in reported:
                    continue
                if node.process.poll() is not None:
                    reported.add(node.name)
                    print(
                        f"keyval cluster: {node.name} exited with code "
                        f"{node.process.returncode}; see {node.log_file}",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(0.2)


async def _cluster_serves(client_toml: Path, drones: int) -> bool:
    """True when all slots are owned, by `drones` drones, each serving a slot it owns."""
    import trio

    from keyval.client import aconnect
    from keyval.keys import NUM_SLOTS
    from keyval.messages import Scan

    with trio.fail_after(10):
        async with aconnect(client_toml) as kv:
            router = kv.router
            table = await router.current_table(router.start())
            routes = [table.route(slot) for slot in range(NUM_SLOTS)]
            if any(route is None for route in routes) or len(table.drones()) < drones:
                return False
            first_slot: dict[str, int] = {}
            for slot, route in enumerate(routes):
                if route is not None:
                    first_slot.setdefault(route.drone, slot)
            for slot in first_slot.values():
                await router.call(slot, Scan(slot=slot, limit=1))
    return True


def cmd_up(args: argparse.Namespace) -> int:
    try:
        cluster = Cluster(args)
    except ClusterError as error:
        print(f"keyval cluster: {error}", file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: FrameType | None) -> None:
        cluster.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.prepare()
        cluster.start_all()
        client_toml = cluster.write_client_files()
        cluster.wait_serving(client_toml)
        if cluster.stopping:
            return 0
        print("keyval cluster ready", flush=True)
        print(f"  client config: {client_toml}", flush=True)
        print(f"  try:   KEYVAL_CONFIG={client_toml} keyval put hello world", flush=True)
        print(f"         keyval --config {client_toml} get hello", flush=True)
        print(f"  admin: keyval admin --config {cluster.root / 'admin.toml'}", flush=True)
        print("  Ctrl-C stops the cluster; run the same command again to resume.", flush=True)
        cluster.supervise()
        return 0
    except ClusterError as error:
        print(f"keyval cluster: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.stop()
        if cluster.stopping:
            print("keyval cluster stopped", flush=True)


# ---------------------------------------------------------------- add-drone

ADDED_KEY = "added"  # nodes.json marks drones started by add-drone; `up` stops them


def _stop_added_drones(root: Path) -> None:
    """SIGTERM the drones `add-drone` started into this cluster (listed in nodes.json)."""
    try:
        nodes = json.loads((root / "nodes.json").read_text())
    except (OSError, ValueError):
        return
    for node in nodes:
        pid = node.get("pid")
        if node.get(ADDED_KEY) and type(pid) is int and pid > 0:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _register_drone_principal(root: Path, name: str, key_file: Path) -> None:
    """Add `name` (role drone) through the running authority, as the cluster's admin."""
    import trio

    from auth import keys
    from auth.client import Credentials
    from auth.messages import PrincipalAdd
    from keyval.nodeconfig import read_toml

    admin = read_toml(root / "admin.toml")
    credentials = Credentials(
        str(admin["name"]), Path(admin["key"]), str(admin["authority"]), str(admin["authority_key"])
    )
    private_key = keys.generate_private_key()
    request = PrincipalAdd(name=name, role="drone", public_key=keys.public_key_bytes(private_key))

    async def add() -> None:
        connection = await credentials.authority_connection()
        async with connection:
            await connection.request(request)

    trio.run(add)
    keys.save_private_key(key_file, private_key)


def cmd_add_drone(args: argparse.Namespace) -> int:
    from wire.errors import WireError

    root = Path(args.dir).resolve()
    try:
        nodes: list[dict[str, Any]] = json.loads((root / "nodes.json").read_text())
        if not (root / "admin.toml").exists():
            raise OSError("no admin.toml")
    except (OSError, ValueError) as error:
        print(f"keyval cluster: {root} is not a running cluster: {error}", file=sys.stderr)
        return 1
    names = {node["name"] for node in nodes}
    index = 1
    while f"drone-{index}" in names or (root / "keys" / f"drone-{index}.key").exists():
        index += 1
    name = f"drone-{index}"
    db = next((n["address"] for n in nodes if n["role"] == "db"), None)
    commanders = [n["address"] for n in nodes if n["role"] == "commander"]
    authority = next((n for n in nodes if n["role"] == "auth"), None)
    if db is None or not commanders or authority is None:
        print(
            "keyval cluster: nodes.json lacks the db, a commander or the authority", file=sys.stderr
        )
        return 1
    key_file = root / "keys" / f"{name}.key"
    try:
        _register_drone_principal(root, name, key_file)
    except (WireError, OSError, KeyError) as error:
        print(f"keyval cluster: cannot register {name}: {error}", file=sys.stderr)
        return 1
    from keyval.nodeconfig import read_toml

    admin = read_toml(root / "admin.toml")
    config = root / "nodes" / f"{name}.toml"
    ready_file = root / "run" / f"{name}.addr"
    ready_file.unlink(missing_ok=True)
    _write_toml(
        config,
        {
            "name": name,
            "key": str(key_file),
            "authority": admin["authority"],
            "authority_key": admin["authority_key"],
            "listen": args.listen or "127.0.0.1:0",
            "ready_file": str(ready_file),
        },
    )
    argv = [sys.executable, "-m", "keyval", "drone", "--config", str(config), "--db", db]
    argv += ["--data", str(root / name)]  # its persisted election vote
    for address in commanders:
        argv += ["--commander", address]
    log_file = (root / "logs" / f"{name}.log").open("ab")
    process = subprocess.Popen(
        argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log_file.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (ready_file.exists() and ready_file.read_text().strip()):
        if process.poll() is not None or time.monotonic() > deadline:
            print(
                f"keyval cluster: {name} did not start; see {root / 'logs' / name}.log",
                file=sys.stderr,
            )
            if process.poll() is None:
                process.terminate()
            return 1
        time.sleep(0.05)
    address = ready_file.read_text().strip()
    nodes.append(
        {
            "role": "drone",
            "name": name,
            "address": address,
            "pid": process.pid,
            "argv": argv,
            ADDED_KEY: True,
        }
    )
    (root / "nodes.json").write_text(json.dumps(nodes, indent=2) + "\n")
    print(f"keyval cluster: {name} serving on {address} (pid {process.pid})", flush=True)
    return 0


if os.name != "posix":  # pragma: no cover - loopback clusters use POSIX signals
    raise ImportError("keyval cluster needs a POSIX system")
