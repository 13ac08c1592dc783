"""Network namespaces for multi-host runs on one machine (tests, benchmarks): each host a namespace, joined
by veth links.

Addresses are 11.x.y.z: go-libp2p does not build relay (circuit) addresses through relays on private
addresses, and these namespaces reach nothing outside themselves anyway.
"""

from __future__ import annotations

import os
import subprocess
import uuid


def ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


def available() -> bool:
    """Whether this process may create network namespaces (root with iproute2)."""
    if os.geteuid() != 0:
        return False
    name = f"swt-probe-{uuid.uuid4().hex[:6]}"
    try:
        ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError):
        return False
    ip("netns", "del", name)
    return True


class Network:
    """Namespaces and links created for one run (a test, a benchmark), deleted by close() or leaving the with
    block."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:4]
        self.namespaces: list[str] = []

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def host(self, name: str) -> str:
        netns = f"swt-{self.tag}-{name}"
        ip("netns", "add", netns)
        self.namespaces.append(netns)
        ip("link", "set", "lo", "up", netns=netns)
        return netns

    def link(self, a: str, a_address: str, b: str, b_address: str) -> None:
        """A veth pair between namespaces a and b with these addresses (CIDR)."""
        pair = f"v{self.tag}{uuid.uuid4().hex[:4]}"  # interface names have at most 15 characters
        end_a, end_b = pair + "a", pair + "b"
        ip("link", "add", end_a, "type", "veth", "peer", "name", end_b)
        for netns, end, address in ((a, end_a, a_address), (b, end_b, b_address)):
            ip("link", "set", end, "netns", netns)
            ip("addr", "add", address, "dev", end, netns=netns)
            ip("link", "set", end, "up", netns=netns)

    def bridge(self, netns: str, hosts: dict[str, str], rates: dict[str, str] | None = None) -> None:
        """A switch in netns joining hosts {namespace: address/CIDR}; rates shape a host's port with tbf. Its
        bucket holds one packet: a larger burst lets small messages (pings) through at line rate, so a slow link
        would look fast to the round trips routing goes by."""
        ip("link", "add", "br0", "type", "bridge", netns=netns)
        ip("link", "set", "br0", "up", netns=netns)
        for i, (host, address) in enumerate(hosts.items()):
            port, end = f"p{i}", f"v{self.tag}{i}"
            ip("link", "add", end, "type", "veth", "peer", "name", port)
            ip("link", "set", port, "netns", netns)
            ip("link", "set", port, "master", "br0", netns=netns)
            ip("link", "set", port, "up", netns=netns)
            ip("link", "set", end, "netns", host)
            ip("addr", "add", address, "dev", end, netns=host)
            ip("link", "set", end, "up", netns=host)
            rate = (rates or {}).get(host)
            if rate:  # both directions: the host's egress and the switch port's egress towards it
                for ns, dev in ((host, end), (netns, port)):
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                    "rate", rate, "burst", "1600", "latency", "400ms"],
                                   check=True, capture_output=True)

    def close(self) -> None:
        for netns in reversed(self.namespaces):  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self.namespaces = []
