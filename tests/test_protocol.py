import asyncio
import zlib

import msgpack
import pytest
import torch

from swarm import protocol
from swarm.protocol import ProtocolError, decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_round_trip_keeps_dtype_and_bits(dtype):
    tensor = torch.randn(3, 5).to(dtype)
    decoded = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(tensor))))
    assert decoded.dtype == dtype and torch.equal(decoded, tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compressed_tensors_keep_every_bit(dtype):
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -3.5e38, 65504.0, 1e-7])
    tensor = torch.cat([torch.randn(4088), special]).to(dtype).view(-1, 8)
    encoded = encode_tensor(tensor, compress=True)
    decoded = decode_tensor(msgpack.unpackb(msgpack.packb(encoded)))
    assert decoded.dtype == dtype and torch.equal(decoded.view(torch.uint8), tensor.view(torch.uint8))
    scalar = torch.tensor(2.5, dtype=dtype)
    assert all(torch.equal(decode_tensor(encode_tensor(scalar, compress)), scalar) for compress in (False, True))
    empty = {"dtype": protocol.DTYPE_NAMES[dtype], "shape": [0, 4], "data": zlib.compress(b""),
             "top_zlib": len(zlib.compress(b""))}
    assert decode_tensor(empty).shape == (0, 4)


@pytest.mark.parametrize("rows", [1, 64])  # 64 rows of 4096 bf16 are above THREAD_BYTES: (de)compressed in a thread
def test_async_coding_round_trips_compressed_tensors(rows):
    tensor = torch.randn(rows, 4096).to(torch.bfloat16)
    assert (rows * 4096 * 2 > protocol.THREAD_BYTES) == (rows == 64)

    async def round_trip():
        return await protocol.decode_tensor_async(await protocol.encode_tensor_async(tensor, compress=True))
    assert torch.equal(asyncio.run(round_trip()), tensor)


def test_compression_shrinks_bf16_hidden_states():
    hidden = torch.randn(256, 1024).to(torch.bfloat16)
    assert len(encode_tensor(hidden, compress=True)["data"]) < 0.8 * len(encode_tensor(hidden)["data"])


def compressed(tensor: torch.Tensor, **changes) -> dict:
    return {**encode_tensor(tensor, compress=True), **changes}


BF16 = torch.randn(16).to(torch.bfloat16)
TOP = zlib.compress(BF16.view(torch.uint8).numpy()[1::2].tobytes())
LOW = BF16.view(torch.uint8).numpy()[0::2].tobytes()
BOMB = zlib.compress(bytes(10**7), 9)


@pytest.mark.parametrize("bad, reason", [
    (compressed(BF16, top_zlib="9"), "top_zlib must count"),
    (compressed(BF16, top_zlib=0), "top_zlib must count"),
    (compressed(BF16, top_zlib=10**6), "top_zlib must count"),
    (compressed(BF16, shape=[17]), "needs 17 bytes after its zlib stream"),
    ({"dtype": "bfloat16", "shape": [16], "data": b"\x78garbage!" + LOW, "top_zlib": 9}, "corrupt"),
    ({"dtype": "bfloat16", "shape": [16], "data": TOP + b"x" + LOW, "top_zlib": len(TOP) + 1}, "exactly"),  # trailing
    ({"dtype": "bfloat16", "shape": [16], "data": TOP[:-3] + LOW, "top_zlib": len(TOP) - 3}, "exactly"),  # cut short
    # 10 KB that inflate to 10 MB: refused after inflating no more than the declared 16 bytes
    ({"dtype": "bfloat16", "shape": [16], "data": BOMB + LOW, "top_zlib": len(BOMB)}, "exactly"),
    ({"dtype": "float32", "shape": [1], "data": b"\0" * 4, "top_zlib": 1, "extra": 1}, "exactly dtype"),
])
def test_bad_compressed_tensors_are_refused_with_a_reason(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_tensor(bad)


@pytest.mark.parametrize("bad, reason", [
    ({"dtype": "float32", "shape": [2, 2], "data": b"\0" * 12}, "needs 16 bytes"),
    ({"dtype": "int64", "shape": [1], "data": b"\0" * 8}, "unsupported tensor dtype"),
    ({"dtype": "float32", "shape": [-1], "data": b""}, "non-negative"),
    ({"dtype": "float32", "shape": [2**40, 2**40], "data": b""}, "needs"),
    ({"dtype": "float32", "shape": [1]}, "exactly dtype, shape and data"),
    ([1, 2, 3], "exactly dtype, shape and data"),
])
def test_bad_tensors_are_refused_with_a_reason(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode_tensor(bad)


def test_frames_need_a_version_and_type():
    assert protocol.unpack(protocol.pack("step", x=1)) == {"v": protocol.PROTOCOL_VERSION, "type": "step", "x": 1}
    with pytest.raises(ProtocolError, match="version"):
        protocol.unpack(msgpack.packb({"v": 999, "type": "step"}))
    with pytest.raises(ProtocolError, match="msgpack"):
        protocol.unpack(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="map"):
        protocol.unpack(msgpack.packb([1, 2]))


def test_oversized_frame_is_refused_before_reading_it():
    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data((2**31).to_bytes(4, "big"))
        return await protocol.read_frame(reader, max_bytes=1024)

    with pytest.raises(ProtocolError, match="exceeds"):
        asyncio.run(read())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compress", [False, True])
def test_a_frame_written_from_rows_reads_as_the_packed_message(dtype, compress):
    rows = [torch.randn(n, 16).to(dtype) for n in (1, 3, 0, 2)]
    fields = {"steps": [{"session": "a", "lengths": [1, 3, 0, 2]}], "draining": False}

    async def written_and_read() -> bytes:
        reader = asyncio.StreamReader()

        class Writer:  # the two calls write_frame makes
            def writelines(self, parts):
                reader.feed_data(b"".join(parts))

            async def drain(self):
                pass

        await protocol.write_frame(Writer(), *await protocol.pack_rows("steps", rows, compress, **fields))
        return await protocol.read_frame(reader)

    message = protocol.unpack(asyncio.run(written_and_read()))
    expected = protocol.unpack(protocol.pack("steps", **fields, hidden=encode_tensor(torch.cat(rows), compress)))
    assert message.keys() == expected.keys() and message["steps"] == expected["steps"]
    assert message["type"] == "steps" and message["draining"] is False
    assert torch.equal(decode_tensor(message["hidden"]).view(torch.uint8), torch.cat(rows).view(torch.uint8))
