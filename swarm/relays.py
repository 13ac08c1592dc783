"""libp2p relays for peers that others cannot dial directly (behind NAT or a firewall).

A relay is a publicly reachable peer (`swarm bootstrap --relay`); a node started with `--relay-via RELAY`
reserves a slot there and is announced through circuit addresses (/p2p/RELAY/p2p-circuit/p2p/NODE), which
clients' daemons find and dial by themselves.
"""

from __future__ import annotations

from hivemind.p2p import P2P


def use_static_relays() -> None:
    """Make p2pd reserve relay slots at once at the relays it is given.

    hivemind's P2P.create cannot turn off p2pd's relay discovery (-relayDiscovery, on by default), under which
    go-libp2p's auto-relay waits for several relay candidates or ~3 minutes before it reserves a slot; with
    discovery off and -trustedRelays set, it uses those relays statically. Call before the DHT starts (its
    process inherits the patch).
    """
    make_args = P2P._make_process_args
    if getattr(make_args, "static_relays", False):
        return

    def with_static_relays(*args, **kwargs):
        if kwargs.get("autoRelay"):
            kwargs["relayDiscovery"] = False
        return make_args(*args, **kwargs)

    with_static_relays.static_relays = True
    P2P._make_process_args = staticmethod(with_static_relays)


def relayed_peer_options(relays: list[str]) -> dict:
    """DHT options for a peer reached only through these relays."""
    use_static_relays()
    # auto-relay acts only when the daemon believes it is not reachable; the user told us so
    return {"use_auto_relay": True, "force_reachability": "private", "trusted_relays": relays}


RELAY_OPTIONS = {"force_reachability": "public"}  # go-libp2p serves as a relay only when it deems itself public
