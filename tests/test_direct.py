"""Direct streams between processes on one machine (swarm/direct.py): sessions and pushes take the nodes' unix
sockets instead of two libp2p daemons, with the same tokens; a ticket is good once and only for its holder's
stream; without a usable socket everything goes over libp2p as before."""

import asyncio
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.remote import run_coroutine
from conftest import assert_same_tokens
from swarm import direct, protocol, rpc
from swarm.protocol import pack, read_frame, unpack, write_frame


@pytest.fixture(autouse=True)
def direct_streams(local_swarm):
    local_swarm.node_arguments = []  # conftest turns them off for the other tests


def generate_and_count(path, swarm, nodes) -> tuple[torch.Tensor, list[int]]:
    """Greedy tokens of a prompt through the swarm, and each node's direct streams afterwards."""
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers) as model:
        ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0))
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
        counts = [run_coroutine(model.connection.node_stats(node.peer_id))["direct_streams"] for node in nodes]
    return tokens, counts


def local_tokens(path) -> tuple[torch.Tensor, AutoModelForCausalLM]:
    local = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0))
    return local.generate(ids, max_new_tokens=12, do_sample=False), local


# direct streams each node served: each node, the client's session and the pushes into it (the first node's, the
# client's; the second's, the first node's)
@pytest.mark.parametrize("arguments, served", [((), [2, 2]), (("--no-direct-streams",), [0, 0])],
                         ids=["on-one-machine", "told-not-to"])
def test_a_session_on_one_machine_streams_directly_unless_told_not_to(tiny_model, local_swarm, arguments, served):
    path = tiny_model("llama")
    nodes = local_swarm.start_nodes(path, [(0, 2), (2, 4)], *arguments)
    tokens, counts = generate_and_count(path, local_swarm, nodes)
    assert counts == served
    expected, local = local_tokens(path)
    assert_same_tokens(tokens, expected, local)


def test_a_ticket_opens_one_stream_of_its_holder(tiny_model, local_swarm):
    path = tiny_model("llama")
    (node,) = local_swarm.start_nodes(path, [(0, 4)])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
        p2p = model.connection.p2p

        async def ticket() -> dict:
            return await rpc.call(p2p, node.peer_id, pack("direct", handler=protocol.INFERENCE_HANDLER))

        async def present(path: str, ticket) -> bytes | None:
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                await write_frame(writer, pack("ticket", ticket=ticket))
                return await asyncio.wait_for(read_frame(reader), 5)
            finally:
                writer.close()

        async def check() -> None:
            granted = await ticket()
            assert granted["type"] == "direct"
            assert await present(granted["path"], os.urandom(16)) is None  # an unknown ticket: the node hangs up
            assert await present(granted["path"], [1, 2]) is None  # garbage in its place too
            assert unpack(await present(granted["path"], granted["ticket"]))["type"] == "ticket_ok"
            assert await present(granted["path"], granted["ticket"]) is None  # used once already
            refused = await rpc.call(p2p, node.peer_id, pack("direct", handler="swarm.unknown"))
            assert refused["type"] == "error" and refused["code"] == "bad_request"
            # a direct stream is served as a libp2p stream is
            granted = await ticket()
            reader, writer = await direct.connect(granted["path"], granted["ticket"])
            await write_frame(writer, pack("ping"))
            assert unpack(await read_frame(reader))["type"] == "pong"
            writer.close()

        run_coroutine(check())
        ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0))
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)  # the node serves on
    expected, local = local_tokens(path)
    assert_same_tokens(tokens, expected, local)


def test_without_a_usable_socket_sessions_go_over_libp2p(tiny_model, local_swarm):
    path = tiny_model("llama")
    nodes = local_swarm.start_nodes(path, [(0, 2), (2, 4)])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
        for node in nodes:  # as if the nodes ran in another mount namespace: the announced socket is not there
            reply = run_coroutine(rpc.call(model.connection.p2p, node.peer_id,
                                           pack("direct", handler=protocol.INFERENCE_HANDLER)))
            os.remove(reply["path"])
    tokens, counts = generate_and_count(path, local_swarm, nodes)
    assert counts == [0, 0]
    expected, local = local_tokens(path)
    assert_same_tokens(tokens, expected, local)


def test_a_peer_writes_only_to_a_swarm_nodes_socket(tmp_path):
    """A node names the socket path in its reply: a path that is not a node's socket of this user (another
    program's socket, say) is refused before anything is written to it."""
    async def check() -> None:
        accepted = []
        other = await asyncio.start_unix_server(lambda r, w: accepted.append(w), str(tmp_path / "other.sock"))
        try:
            for path in (str(tmp_path / "other.sock"), str(tmp_path / "node.sock"), 42):
                with pytest.raises(ConnectionError):
                    await direct.connect(path, os.urandom(16))
        finally:
            other.close()
        assert accepted == []

    asyncio.run(check())


def test_a_starting_node_removes_the_socket_directories_of_killed_nodes():
    """A node killed by SIGKILL cannot remove its socket's directory; the next node to start removes this user's
    directories that are STALE_SECONDS old and refuse connections or hold no socket, and leaves those of live
    nodes and of nodes that may be starting."""
    old = time.time() - direct.STALE_SECONDS - 1

    def socket_directory(name: str, bound: bool, listening: bool = False, modified: float = old):
        path = Path(tempfile.mkdtemp(prefix=f"swarm-direct-{name}-"))
        sock = socket.socket(socket.AF_UNIX)
        if bound:
            sock.bind(str(path / "node.sock"))
        if listening:
            sock.listen()
        else:
            sock.close()  # its file stays, refusing connections
        os.utime(path, (modified, modified))
        return path, sock

    async def check() -> None:
        killed, _ = socket_directory("killed", bound=True)
        empty, _ = socket_directory("empty", bound=False)
        live, listener = socket_directory("live", bound=True, listening=True)
        young, _ = socket_directory("young", bound=True, modified=time.time())
        server = direct.DirectServer({})
        try:
            await server.start()
            assert not killed.exists() and not empty.exists()
            assert live.exists() and young.exists() and Path(server.path).exists()
        finally:
            await server.stop()
            listener.close()
            for path in (killed, empty, live, young):
                shutil.rmtree(path, ignore_errors=True)

    asyncio.run(check())


def test_a_direct_stream_carries_frames_whole_and_in_order_and_ends_cleanly():
    """Frames of 0 bytes to 5 MB arrive whole and in order, also when they pile up before the reader takes them
    (the stream then stops reading until they are taken); a stream that ends between frames reads as ended,
    inside a frame as an error, and a frame over MAX_FRAME_BYTES is refused."""
    sizes = [0, 1, 4, 300_000, 5 * 2**20, 17, 2**20 + 3]

    async def check() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        _, reader = await loop.create_unix_connection(direct.FrameStream, sock=ours)
        _, writer = await loop.create_unix_connection(direct.FrameStream, sock=theirs)
        frames = [os.urandom(n) for n in sizes]

        async def write_all() -> None:
            for frame in frames:
                await write_frame(writer, frame)
            writer.close()

        writing = asyncio.create_task(write_all())
        await asyncio.sleep(0.2)  # the frames pile up
        assert [bytes(await read_frame(reader)) for _ in frames] == frames
        await writing
        assert await read_frame(reader) is None

        for raw, error in ((protocol.FRAME_HEADER.pack(100) + b"x" * 10, "ended inside a frame"),
                           (protocol.FRAME_HEADER.pack(protocol.MAX_FRAME_BYTES + 1), "exceeds the limit")):
            ours, theirs = socket.socketpair(socket.AF_UNIX)
            _, reader = await loop.create_unix_connection(direct.FrameStream, sock=ours)
            theirs.sendall(raw)
            theirs.close()
            with pytest.raises(protocol.ProtocolError, match=error):
                await read_frame(reader)
            reader.close()

    async def within_a_minute() -> None:
        async with asyncio.timeout(60):
            await check()

    asyncio.run(within_a_minute())
