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
    for name, help, add_arguments, run in [
        ("node", "serve a span of a model's blocks", node_cli.add_arguments, node_cli.run),
        ("bootstrap", "start a DHT-only peer that others join through", bootstrap.add_arguments, bootstrap.run),
        ("status", "show the models served, their nodes, block coverage and sessions", status.add_arguments, status.run),
        ("generate", "continue a prompt through the swarm, streaming the text", client_cli.add_generate_arguments,
         client_cli.generate),
        ("chat", "chat with a model in the swarm from the terminal", client_cli.add_chat_arguments, client_cli.chat),
        ("api", "serve an OpenAI-compatible HTTP API backed by the swarm", api.add_arguments, api.run),
    ]:
        command = commands.add_parser(name, help=help)
        add_arguments(command)
        command.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
