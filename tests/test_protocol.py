import asyncio

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
