"""`swarm node`: serve a span of a model's blocks."""

from __future__ import annotations

import argparse

import torch
import uvloop

from swarm import logs
from swarm.bootstrap import PUBLIC_INITIAL_PEERS
from swarm.checkpoint import model_name
from swarm.devices import device_argument
from swarm.heap import keep_freed_memory
from swarm.protocol import DTYPES

def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--blocks takes START:END, e.g. 0:16, not {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"--blocks {text}: need 0 <= START < END")
    return start, end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder of a transformers checkpoint (safetensors)")
    parser.add_argument("--blocks", type=parse_blocks,
                        help="span of blocks to serve, START:END (default: the span the swarm needs most, "
                             "re-checked every --balance-period)")
    parser.add_argument("--num-blocks", type=int, help="span length without --blocks (default: as many as fit "
                                                        "in memory next to the KV cache)")
    parser.add_argument("--model-name", help="name the swarm knows the model by (default: the folder's name)")
    parser.add_argument("--initial-peers", nargs="*", default=PUBLIC_INITIAL_PEERS,
                        help="multiaddrs of peers in the swarm (default: the public swarm's bootstrap peers)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (0 picks a free one)")
    parser.add_argument("--public-ip", help="address others dial to reach this node (behind port forwarding); "
                                            "needs --port")
    parser.add_argument("--announce-maddrs", nargs="*", default=[], help="multiaddrs others dial to reach this node")
    parser.add_argument("--public-name", default="", help="a display name shown by `swarm status`")
    parser.add_argument("--relay-via", nargs="*", default=[],
                        help="multiaddrs of relay peers: when this node is not directly reachable, it is "
                             "announced through them and says so in its record")
    parser.add_argument("--relay", action="store_true", help="relay connections for peers that are not directly "
                                                            "reachable (needs a public address)")
    parser.add_argument("--no-direct-streams", dest="direct_streams", action="store_false",
                        help="serve peers on this machine over libp2p too, not on a unix socket (see README)")
    parser.add_argument("--swarm-key", help="key file of a private swarm (made by `swarm bootstrap "
                                            "--new-private-swarm`); without it the node joins a public swarm")
    parser.add_argument("--throughput", type=float, help="decode tokens/s to announce instead of measuring them")
    parser.add_argument("--balance-period", type=float, default=120.0,
                        help="seconds between checks whether moving the span makes the swarm faster (0: never)")
    parser.add_argument("--balance-margin", type=float, default=0.2,
                        help="move only if the swarm's weakest blocks get this much faster (0.2 = 20%%)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds a leaving node (SIGTERM) waits for its clients to move their sessions, and a "
                             "moving node waits before it stays instead")
    parser.add_argument("--device", type=device_argument, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda where there is a GPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--kv-cache-gb", type=float,
                        help="memory for the paged KV cache (default: on a GPU, 90%% of what the loaded blocks leave "
                             "free less 1 GB, so set it where several nodes share a GPU; on a CPU, 0.25)")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    parser.add_argument("--max-length", type=int, help="longest session accepted, in tokens")
    parser.add_argument("--max-batch-tokens", type=int, default=512,
                        help="tokens per forward pass: decodes first, then prefill chunks in the rest")
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences per forward pass and per session")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run decode steps eagerly instead of replaying CUDA graphs (GPU nodes)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="capture the decode graphs from the layers as they are, without torch.compile fusing "
                             "their small kernels first (faster start, slower decoding)")
    parser.add_argument("--kv-overcommit", type=float, default=2.0,
                        help="admit sessions until their declared lengths need this many times the pool's pages; "
                             "when actual use outgrows the pool, junior sessions are preempted")
    parser.add_argument("--swap-gb", type=float, default=0.0,
                        help="host memory for preempted sessions' KV pages; without room they are recomputed")
    parser.add_argument("--queue-timeout", type=float, default=60.0,
                        help="seconds a new session may wait for KV cache room before it is refused")
    parser.add_argument("--max-sessions-per-peer", type=int, default=64, help="open sessions one client may hold")
    parser.add_argument("--max-sessions", type=int, default=1024, help="open and queued sessions of all clients")
    parser.add_argument("--max-requests-per-peer", type=float, default=10000.0,
                        help="requests per second one peer may send on average (bursts of twice that); a node "
                             "pushing the steps of all its sessions to this one counts as one peer")
    parser.add_argument("--max-queued-tokens-per-peer", type=int, default=65536,
                        help="tokens one client may have waiting for computation")
    parser.add_argument("--num-threads", type=int,
                        help="torch threads for compute (default: 1 on a GPU, else torch's choice); lower it when "
                             "several CPU nodes share a machine's cores")
    parser.add_argument("--identity", help="private key file; created if missing, so the peer id stays the same")
    parser.add_argument("--session-timeout", type=float, default=300.0, help="seconds before an idle session is closed")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics (sessions, queued steps, tokens/s, KV pages, preemptions) "
                             "at http://HOST:PORT/metrics, HOST being --host")
    logs.add_arguments(parser)
    parser.add_argument("--announce-period", type=float, default=10.0, help="seconds between DHT record refreshes")


def run(args: argparse.Namespace) -> None:
    from node.server import Node, NodeConfig  # torch model code is imported only by the commands that need it

    logs.setup(args.log_format)
    keep_freed_memory()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    elif args.device.startswith("cuda"):
        # The host only packs and copies small tensors here; torch's pool of one thread per core made every copy of
        # more than 32K elements a parallel region, and its spinning threads took ~6 cores per node (H200, 64 sessions)
        torch.set_num_threads(1)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    announce_maddrs = list(args.announce_maddrs)
    if args.public_ip:
        if not args.port:
            raise SystemExit("--public-ip needs a fixed --port that others can dial")
        announce_maddrs.append(f"/ip4/{args.public_ip}/tcp/{args.port}")
    config = NodeConfig(
        model_path=args.model, model_name=args.model_name or model_name(args.model), blocks=args.blocks,
        num_blocks=args.num_blocks, initial_peers=args.initial_peers, host=args.host, port=args.port,
        device=args.device, dtype=dtype, kv_cache_gb=args.kv_cache_gb, page_size=args.page_size,
        max_length=args.max_length, max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size,
        cuda_graphs=args.cuda_graphs, compile=args.compile, kv_overcommit=args.kv_overcommit, swap_gb=args.swap_gb,
        queue_timeout=args.queue_timeout,
        max_sessions_per_peer=args.max_sessions_per_peer, max_sessions=args.max_sessions,
        max_requests_per_peer=args.max_requests_per_peer, max_queued_tokens_per_peer=args.max_queued_tokens_per_peer,
        throughput=args.throughput, balance_period=args.balance_period, balance_margin=args.balance_margin,
        drain_timeout=args.drain_timeout, identity_path=args.identity, announce_maddrs=announce_maddrs,
        relay_via=args.relay_via, relay=args.relay, direct_streams=args.direct_streams, swarm_key_path=args.swarm_key, public_name=args.public_name,
        session_timeout=args.session_timeout, announce_period=args.announce_period, metrics_port=args.metrics_port,
        record_ttl=3 * args.announce_period,  # a node that vanished drops out of routing after three missed refreshes
    )
    node = Node(config)
    uvloop.run(node.run())
