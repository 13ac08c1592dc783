"""A DHT-only peer that new nodes and clients join through (`swarm bootstrap`)."""

from __future__ import annotations

import argparse
import signal
import threading

from hivemind.dht import DHT

from swarm.dht import shutdown_dht
from swarm.records import SignedRecordValidator
from swarm.relays import RELAY_OPTIONS
from swarm.swarm_key import SwarmKey

# Multiaddrs of the public swarm's bootstrap peers, the default of every --initial-peers. Empty until the
# public swarm has one: until then, start a private swarm with `swarm bootstrap`.
PUBLIC_INITIAL_PEERS: list[str] = []


def add_initial_peers_argument(parser: argparse.ArgumentParser) -> None:
    """--initial-peers of the commands that use a swarm: required while the public swarm has no bootstrap peers."""
    parser.add_argument("--initial-peers", nargs="+", default=PUBLIC_INITIAL_PEERS, required=not PUBLIC_INITIAL_PEERS,
                        help="multiaddrs of peers in the swarm, as `swarm bootstrap` and nodes print them")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--identity", help="private key file; created if missing, so the peer id stays the same")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1 for a local swarm)")
    parser.add_argument("--port", type=int, default=31337, help="TCP port (0 picks a free one)")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="join an existing swarm through these multiaddrs")
    parser.add_argument("--new-private-swarm", metavar="KEY_FILE",
                        help="start a private swarm: write a new swarm key to KEY_FILE; give it (only) to its "
                             "members' --swarm-key")
    parser.add_argument("--relay", action="store_true", help="relay connections for nodes that are not directly "
                                                            "reachable (they join with --relay-via)")


def run(args: argparse.Namespace) -> None:
    if args.new_private_swarm:
        SwarmKey.create(args.new_private_swarm)
        print(f"wrote the swarm key of a new private swarm to {args.new_private_swarm}", flush=True)
    dht = DHT(initial_peers=args.initial_peers, start=True, identity_path=args.identity,
              host_maddrs=[f"/ip4/{args.host}/tcp/{args.port}"], record_validators=[SignedRecordValidator()],
              **(RELAY_OPTIONS if args.relay else {}))
    print("bootstrap peer is up; pass these to --initial-peers:", flush=True)
    print(" ".join(str(maddr) for maddr in dht.get_visible_maddrs()), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    shutdown_dht(dht)
