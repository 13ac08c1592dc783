"""The wire protocol between clients and nodes: length-prefixed msgpack frames over libp2p streams.

Every frame is a msgpack map with the protocol version ``v`` and a message ``type``. Tensors travel
as ``{"dtype": str, "shape": [..], "data": bytes}`` so that bf16/fp16 stay native and a peer can check
the declared size before touching the bytes. This module knows nothing about torch modules, only
about tensors as raw buffers.

Sessions on slow links may compress their tensors, losslessly, so outputs stay exactly those of an
uncompressed session. A compressed tensor adds ``"top_zlib": n``: the first n bytes of data are the
zlib stream of every element's most significant byte (sign and exponent bits, which repeat a few values
across hidden states), the rest are the other bytes of each element, in order. The mantissa bytes are
noise to zlib, so they are left out of it: bf16 hidden states shrink by ~28% (fp16 and float32 by ~14%)
at ~3x the speed of compressing them whole (scripts/bench/compression.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 1
# client to node: one stream carries all of a client's sessions on a node. The client sends {"type": "open",
# "request": n, ...} (answered by "opened" or "error" with that request number), "step" and "close" frames naming
# their session; the node answers a forward's steps of that client's sessions with one {"type": "outputs",
# "outputs": [{session, rows, pushed}, ...], "hidden": the rows of all of them, in order, "draining": bool}, and
# errors with the session or request they concern. (v1 opened a stream per session and answered each step alone.)
INFERENCE_HANDLER = "swarm.inference.v2"
# node to node: the steps of sessions' chains, pushed by the previous node. A push frame carries every step one
# forward of that node sends on: {"type": "steps", "steps": [{session, lengths, page_hashes, push}, ...], "hidden":
# the rows of all of them, in order}, so the next node reads, decodes and checks one tensor per forward, not per
# session. (v1 pushed a frame per step; a node of either version fails to open the other's stream, and the client
# then carries the outputs itself.)
PUSH_HANDLER = "swarm.push.v2"
MAX_FRAME_BYTES = 256 * 1024 * 1024
FRAME_HEADER = struct.Struct(">I")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


PAGE_HASH_BYTES = 16


def page_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
    """Link of a sequence's token-hash chain for one full KV page: equal chains mean equal prefixes, so a
    node can share the page without seeing the tokens. previous is b"" for the first page."""
    data = previous + b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens)
    return hashlib.blake2b(data, digest_size=PAGE_HASH_BYTES).digest()


class ProtocolError(ValueError):
    """A peer sent a frame that does not follow the protocol."""


def encode_tensor(tensor: torch.Tensor, compress: bool = False) -> dict[str, Any]:
    if tensor.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"unsupported tensor dtype {tensor.dtype}")
    tensor = tensor.detach().contiguous().cpu()
    encoded = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
    if not tensor.numel():
        return {**encoded, "data": b""}
    elements = tensor.reshape(-1).view(torch.uint8).numpy().reshape(tensor.numel(), tensor.element_size())
    if not compress:
        return {**encoded, "data": elements.tobytes()}
    # level 1: higher levels took 6x as long for 2% less (bf16 hidden states)
    top = zlib.compress(elements[:, -1].tobytes(), 1)  # little-endian: the last byte holds sign and exponent
    return {**encoded, "data": top + elements[:, :-1].tobytes(), "top_zlib": len(top)}


def decode_tensor(obj: Any) -> torch.Tensor:
    """Rebuild a tensor, checking that the declared dtype and shape match the bytes exactly."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= obj.keys() <= {"dtype", "shape", "data",
                                                                                    "top_zlib"}:
        raise ProtocolError("a tensor must be a map with exactly dtype, shape and data (and top_zlib if compressed)")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"tensor shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(data, bytes):
        raise ProtocolError("tensor data must be bytes")
    torch_dtype = DTYPES[dtype]
    numel = math.prod(shape)
    if "top_zlib" in obj:
        elements = _decompress(data, obj["top_zlib"], numel, torch_dtype.itemsize)
        return torch.from_numpy(elements).view(torch_dtype).view(shape) if numel else torch.empty(shape,
                                                                                                  dtype=torch_dtype)
    if numel * torch_dtype.itemsize != len(data):
        raise ProtocolError(f"tensor of shape {shape} and dtype {dtype} needs {numel * torch_dtype.itemsize} bytes, "
                            f"got {len(data)}")
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).view(shape)


def _decompress(data: bytes, top_length: Any, numel: int, itemsize: int) -> np.ndarray:
    """The bytes of a compressed tensor's elements, [numel, itemsize]. The zlib stream may inflate to no more than
    the declared elements' top bytes, so a small frame cannot make the node allocate much more than its size."""
    if type(top_length) is not int or not 0 < top_length <= len(data):
        raise ProtocolError(f"top_zlib must count the bytes of the zlib stream within data, got {top_length!r}")
    rest = data[top_length:]
    if numel * (itemsize - 1) != len(rest):
        raise ProtocolError(f"compressed tensor of {numel} elements needs {numel * (itemsize - 1)} bytes after its "
                            f"zlib stream, got {len(rest)}")
    stream = zlib.decompressobj()
    try:
        top = stream.decompress(data[:top_length], numel)
    except zlib.error as e:
        raise ProtocolError(f"tensor's zlib stream is corrupt: {e}") from None
    if len(top) != numel or not stream.eof or stream.unconsumed_tail or stream.unused_data:
        raise ProtocolError(f"tensor's zlib stream must hold exactly its {numel} elements' top bytes")
    elements = np.empty((numel, itemsize), dtype=np.uint8)
    elements[:, -1] = np.frombuffer(top, dtype=np.uint8)
    elements[:, :-1] = np.frombuffer(rest, dtype=np.uint8).reshape(numel, itemsize - 1)
    return elements


# Compressed tensors larger than this are (de)compressed in a thread: a 2048-row bf16 prefill took 200 ms to
# compress on a 2-core machine, and zlib and numpy's copies release the GIL, so the event loop keeps serving
# other sessions meanwhile (longest stall 216 ms inline, 9 ms in a thread).
THREAD_BYTES = 256 * 1024


async def encode_tensor_async(tensor: torch.Tensor, compress: bool = False) -> dict[str, Any]:
    """encode_tensor for event loops: a large compressed tensor is encoded in a thread."""
    if compress and tensor.numel() * tensor.element_size() > THREAD_BYTES:
        return await asyncio.to_thread(encode_tensor, tensor, compress)
    return encode_tensor(tensor, compress)


async def decode_tensor_async(obj: Any) -> torch.Tensor:
    """decode_tensor for event loops: a large compressed tensor is decoded in a thread."""
    if isinstance(obj, dict) and "top_zlib" in obj and isinstance(obj.get("data"), bytes) \
            and len(obj["data"]) > THREAD_BYTES:
        return await asyncio.to_thread(decode_tensor, obj)
    return decode_tensor(obj)


_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80)}  # numpy has no bfloat16: its bits, and the exponent's mask


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or infinite. On the host this checks with numpy, 5-25x faster than
    torch.isfinite on CPU (which took 5 ms for a 512-token chunk of 4096-wide rows)."""
    if tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    if tensor.dtype in _EXPONENT:  # a float is NaN or infinite exactly when all its exponent bits are set
        view, mask = _EXPONENT[tensor.dtype]
        return not np.any(tensor.view(view).numpy() & mask == mask)
    return bool(np.isfinite(tensor.numpy()).all())


def pack(message_type: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": message_type, **fields}, use_bin_type=True)


_BIN32 = struct.Struct(">BI")
_packer = msgpack.Packer(use_bin_type=True)


async def pack_rows(message_type: str, rows: Sequence[torch.Tensor], compress: bool = False,
                    **fields: Any) -> list[bytes | memoryview]:
    """The frame pack(message_type, **fields, hidden=encode_tensor(torch.cat(rows))) as buffers to write one after
    another: uncompressed, the joined rows go out from their tensor's own memory behind the frame's header, which
    saves copying them twice more (tobytes, msgpack) into a fresh frame whose pages fault in anew each step. One
    cat is cheaper than a view per row: those cost 5-13 µs a row on an H200 host (py-spy, 64 sessions, 10% of a
    client's samples), where gpu.py's 64 sessions then decoded 3,263 tokens/s against 2,851-3,130 (single runs)."""
    if compress:
        return [pack(message_type, **fields, hidden=await encode_tensor_async(torch.cat(rows), compress))]
    hidden = (torch.cat(rows) if len(rows) > 1 else rows[0]).detach().contiguous().cpu()  # no-ops on a host tensor
    if hidden.dtype not in DTYPE_NAMES:
        raise ProtocolError(f"unsupported tensor dtype {hidden.dtype}")
    data = [memoryview(hidden.view(torch.uint8).numpy()).cast("B")] if hidden.numel() else []
    # msgpack of {"v", "type", **fields, "hidden": {"dtype", "shape", "data"}}, whose last value, data, is a bin
    # of the rows' bytes: its header here, the bytes after it
    head = b"".join([_packer.pack_map_header(3 + len(fields)),
                     *map(_packer.pack, ("v", PROTOCOL_VERSION, "type", message_type, *itertools.chain(*fields.items()),
                                         "hidden")),
                     _packer.pack_map_header(3),
                     *map(_packer.pack, ("dtype", DTYPE_NAMES[hidden.dtype], "shape", list(hidden.shape), "data")),
                     _BIN32.pack(0xC6, sum(part.nbytes for part in data))])
    return [head, *data]


def unpack(frame: bytes) -> dict[str, Any]:
    """Decode one frame; raise ProtocolError for anything that is not a versioned message map."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"frame is not valid msgpack: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame must be a msgpack map")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r}; this peer speaks {PROTOCOL_VERSION}")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("frame has no message type")
    return message


def error_frame(code: str, message: str, **ids: Any) -> bytes:
    """ids: the session or open request that the error answers, on a stream that carries many."""
    return pack("error", code=code, message=message, **ids)


async def write_frame(writer: asyncio.StreamWriter, *parts: bytes | memoryview) -> None:
    """Write a frame, given whole or in parts (pack_rows)."""
    # writelines: one send (writev) through the socket to p2pd, without copying the frame behind its header
    writer.writelines((FRAME_HEADER.pack(sum(part.nbytes if isinstance(part, memoryview) else len(part)
                                             for part in parts)), *parts))
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> bytes | memoryview | None:
    """Read one frame; None on a clean end of stream. Refuses frames over max_bytes before reading them. The reader
    is a libp2p stream's StreamReader, or a direct stream (swarm/direct.py), which hands out frames in place."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ProtocolError("stream ended inside a frame header") from None
        return None
    (length,) = FRAME_HEADER.unpack(header)
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("stream ended inside a frame") from None
