"""Test hosts on one machine: N network namespaces joined by a bridge, each with its own address.

    python tests/support/netns.py up 2      # create hosts ctmn<pid>h0, ctmn<pid>h1 (prints name, ifname, address)
    python tests/support/netns.py down      # remove test hosts whose creating process is gone
    python tests/support/netns.py down all  # remove every test host (ctmn* namespaces)
    ip netns exec <name> <command>  # run something "on" a host

Topology: a hub namespace holds a bridge ``br0``; host i is a namespace with one veth ``eth0``
(address 10.77.0.<i+1>/24) whose peer ``v<i>`` is a port of the bridge. Nothing is created in
the machine's own network namespace, so its interfaces and routes are never touched; cutting
host i off the network is ``ip -n <hub> link set v<i> down`` (:meth:`Host.cut`).

Namespace names carry the creating process's id (``ctmn<pid>h<i>``, ``ctmn<pid>hub``), so a
later run can tell leftovers of a crashed run (their creator is dead) from a live run's hosts
and remove only those (:func:`remove_stale`). Needs root.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

PREFIX = "ctmn"
SUBNET = "10.77.0"
_NAME = re.compile(rf"^{PREFIX}(\d+)(h\d+|hub)$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def pids_in(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns``."""
    result = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in result.stdout.split() if p.isdigit()]


def kill_all_in(netns: str, timeout: float = 30) -> list[int]:
    """SIGKILL every process in a namespace (a host losing power) and wait until they are gone.

    Args:
        netns: the namespace name.
        timeout: seconds to wait for the kernel to take them down.

    Returns:
        The pids that were killed.
    """
    killed = pids_in(netns)
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids_in(netns) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def _delete(netns: str) -> None:
    kill_all_in(netns)
    _ip("netns", "delete", netns, check=False)  # its veth ends (and their peers) go with it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove test namespaces left by runs whose creating process is dead.

    Returns:
        The names removed.
    """
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _delete(name)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One test host: a network namespace with one address.

    Args:
        name: the namespace name (``ip netns exec NAME ...``).
        address: its IPv4 address on the test network.
        ifname: its interface (the value for ``GLOO_SOCKET_IFNAME``).
        hub: the hub namespace holding the bridge.
        port: the bridge port (veth peer) in the hub.
    """

    name: str
    address: str
    ifname: str
    hub: str
    port: str

    def cmd(self, args: list[str]) -> list[str]:
        """``args`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def cut(self) -> None:
        """Partition this host from all others (its bridge port goes down: packets are dropped,
        no reset reaches either side)."""
        _ip("-n", self.hub, "link", "set", self.port, "down")

    def restore(self) -> None:
        """Undo :meth:`cut`."""
        _ip("-n", self.hub, "link", "set", self.port, "up")

    def kill_all(self) -> list[int]:
        """SIGKILL every process running on this host."""
        return kill_all_in(self.name)

    def pids(self) -> list[int]:
        return pids_in(self.name)


@dataclass
class Network:
    """N test hosts on one bridge; a context manager that removes everything on exit.

    Args:
        count: number of hosts (at most 250).
        owner: process id written into the names (default: this process).
    """

    count: int
    owner: int = field(default_factory=os.getpid)
    hosts: list[Host] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.owner}hub"

    def up(self) -> "Network":
        """Create the hub, the bridge and the hosts (removing any partial state on failure)."""
        if not 1 <= self.count <= 250:
            raise ValueError(f"count must be 1..250, got {self.count}")
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i in range(self.count):
                host = Host(f"{PREFIX}{self.owner}h{i}", f"{SUBNET}.{i + 1}", "eth0", self.hub, f"v{i}")
                _ip("netns", "add", host.name)
                # Created straight inside the two namespaces: nothing appears in the root one.
                _ip("-n", self.hub, "link", "add", host.port, "type", "veth", "peer", "name", host.ifname,
                    "netns", host.name)
                _ip("-n", self.hub, "link", "set", host.port, "master", "br0", "up")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.ifname)
                _ip("-n", host.name, "link", "set", host.ifname, "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
                self.hosts.append(host)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process on the hosts and delete the namespaces (links go with them)."""
        for name in [h.name for h in self.hosts] + [self.hub]:
            if name in namespaces():
                _delete(name)
        self.hosts.clear()

    def __enter__(self) -> "Network":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and len(argv) == 2 and argv[1].isdigit():
        # Named after this script's parent shell, so that `down` keeps them while it lives.
        net = Network(int(argv[1]), owner=os.getppid()).up()
        for host in net.hosts:
            print(host.name, host.ifname, host.address)
        return 0
    if argv in (["down"], ["down", "all"]):
        if argv[1:]:
            for name in namespaces():
                if _NAME.match(name):
                    _delete(name)
                    print("removed", name)
        for name in remove_stale():
            print("removed", name)
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
