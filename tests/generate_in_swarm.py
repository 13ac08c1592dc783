"""Generate through a swarm from another process (e.g. inside a network namespace) and print what happened.

    python tests/generate_in_swarm.py MODEL --initial-peers MADDR... --ids 5 17 42 --max-new-tokens 8 --runs 3

Prints one JSON line: per run, the tokens (prompt included) and the peer ids of the route it took.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import DistributedModelForCausalLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--ids", type=int, nargs="+", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    ids = torch.tensor([args.ids])
    runs = []
    with DistributedModelForCausalLM.from_pretrained(args.model, initial_peers=args.initial_peers) as model:
        for _ in range(args.runs):
            with model.inference_session(max_length=len(args.ids) + args.max_new_tokens) as session:
                tokens = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                runs.append({"tokens": tokens[0].tolist(), "route": [s.hop.node.peer_id for s in session.spans]})
    print(json.dumps({"runs": runs}), flush=True)


if __name__ == "__main__":
    main()
