"""Time from a node's kill to the next token, at a long context.

    python scripts/bench/failover.py                  # tiny llama, 1000-token context, 4 kills
    python scripts/bench/failover.py --context 2000 --rounds 6

A loopback swarm with two nodes per span (blocks 0:2 and 2:4). One session prefills --context tokens and
decodes; each round kills (SIGKILL, with its libp2p daemon) the node serving one of the session's spans,
alternating, right before a decode step, and times that step: detecting the broken stream, banning the node,
planning the span again, opening a session on the other replica, replaying the context there, and finishing
the step. A node for the same span is started again before the next round. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from local_swarm import LocalSwarm, scratch_folder  # noqa: E402

SPANS = [(0, 2), (2, 4)]
NODE_OPTIONS = ["--throughput", "100", "--announce-period", "1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1000, help="tokens in the session when the node dies")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch

    from client import DistributedModelForCausalLM
    from client.session import InferenceSession
    from make_tiny_model import make_tiny_model

    workdir = scratch_folder("bench-failover-")
    model_path = make_tiny_model(workdir / "tiny-llama", "llama")
    recoveries, decode_steps = [], []
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.start_nodes(model_path, SPANS * 2, *NODE_OPTIONS)
        with DistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers) as model:
            embed, norm, head = model.get_input_embeddings(), model.base_model.norm, model.get_output_embeddings()
            prompt = torch.randint(3, model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode(), InferenceSession(model.connection, model.swarm_model_name, model.num_blocks,
                                                          args.context + 4 * args.rounds + 4) as session:
                out = session.step(embed(prompt)[None])

                def decode() -> float:
                    nonlocal out
                    began = time.perf_counter()
                    out = session.step(embed(head(norm(out[:, -1:])).argmax(-1)))
                    return time.perf_counter() - began

                for i in range(args.rounds):
                    decode_steps.extend(decode() for _ in range(3))
                    victim = swarm.node_process(session.spans[i % len(session.spans)].hop.node.peer_id)
                    swarm.kill(victim)
                    recoveries.append(decode())
                    swarm.start_nodes(model_path, [victim.span], *NODE_OPTIONS)
                failovers = len(session.failovers)
    print(json.dumps({
        "bench": "failover", "context_tokens": args.context, "rounds": args.rounds, "failovers": failovers,
        "kill_to_next_token_s": [round(t, 3) for t in recoveries],
        "median_s": round(statistics.median(recoveries), 3), "max_s": round(max(recoveries), 3),
        "normal_decode_step_s": round(statistics.median(decode_steps), 4),
    }))


if __name__ == "__main__":
    main()
