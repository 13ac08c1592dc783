"""The `swarm` command."""

from __future__ import annotations

import argparse
import sys

from swarm import bootstrap


def main(argv: list[str] | None = None) -> None:
    from client import api, status
    from client import cli as client_cli
    from node import cli as node_cli

    parser = argparse.ArgumentParser(prog="swarm", description="Serve and use language models from a swarm of nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    node_parser = commands.add_parser("node", help="serve a span of a model's blocks")
    node_cli.add_arguments(node_parser)
    node_parser.set_defaults(run=node_cli.run)
    bootstrap_parser = commands.add_parser("bootstrap", help="start a DHT-only peer that others join through")
    bootstrap.add_arguments(bootstrap_parser)
    bootstrap_parser.set_defaults(run=bootstrap.run)
    status_parser = commands.add_parser("status", help="show the models served, their nodes, block coverage and sessions")
    status.add_arguments(status_parser)
    status_parser.set_defaults(run=status.run)
    generate_parser = commands.add_parser("generate", help="continue a prompt through the swarm, streaming the text")
    client_cli.add_generate_arguments(generate_parser)
    generate_parser.set_defaults(run=client_cli.generate)
    chat_parser = commands.add_parser("chat", help="chat with a model in the swarm from the terminal")
    client_cli.add_chat_arguments(chat_parser)
    chat_parser.set_defaults(run=client_cli.chat)
    api_parser = commands.add_parser("api", help="serve an OpenAI-compatible HTTP API backed by the swarm")
    api.add_arguments(api_parser)
    api_parser.set_defaults(run=api.run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
