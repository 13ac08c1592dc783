"""The node's scheduler in process, against the full transformers model: batching, admission, preemption, sharing."""

import asyncio
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import reference_hidden_states
from node import scheduler as scheduler_module
from node.kv_cache import PagePool
from node.scheduler import AdmissionError, Chunk, Scheduler, Sequence, Session
from node.span import Span
from swarm.protocol import page_hash

PAGE = 4


@pytest.fixture(scope="module")
def model(tiny_model):
    path = tiny_model("llama")
    return Span(path, 0, 4), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_scheduler(span, num_pages, **options) -> Scheduler:
    pool = PagePool(span.layer_count, num_pages, PAGE, span.kv_heads, span.head_dim, torch.float32, span.device)
    options.setdefault("max_batch_size", 8)
    options.setdefault("max_batch_tokens", 64)
    return Scheduler(span, pool, **options)


def new_session(max_length: int, priority: int = 0) -> Session:
    return Session(uuid.uuid4().hex, "peer", 0, 4, max_length, priority, [Sequence()])


def page_keys(ids: torch.Tensor, start: int, end: int) -> list[list[bytes]]:
    """The token-hash chain of the pages that tokens [start, end) complete."""
    chain = [b""]
    for page in range(end // PAGE):
        chain.append(page_hash(chain[-1], ids[page * PAGE:(page + 1) * PAGE].tolist()))
    return [chain[1 + start // PAGE:1 + end // PAGE]]


async def generate(scheduler: Scheduler, session: Session, ids: torch.Tensor, inputs: torch.Tensor, prefill: int,
                   prefilled: asyncio.Barrier | None = None) -> torch.Tensor:
    """Admit the session, send a prefill of `prefill` rows, then one row per step; returns every output row."""
    await scheduler.admit(session)
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, len(ids))]
    outputs = []
    for i, (a, b) in enumerate(steps):
        outputs.append(await scheduler.submit(session, inputs[a:b], [b - a], page_keys(ids, a, b)))
        if i == 0 and prefilled is not None:
            await prefilled.wait()
    scheduler.close(session)
    return torch.cat(outputs)


def run(scheduler: Scheduler, *coroutines):
    async def main():
        loop_task = asyncio.create_task(scheduler.run())
        try:
            return await asyncio.wait_for(asyncio.gather(*coroutines), 120)
        finally:
            loop_task.cancel()

    return asyncio.run(main())


def prompts(reference, lengths, seed=0, prefix=None):
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 500, (n,), generator=generator) for n in lengths]
    if prefix is not None:
        ids = [torch.cat([prefix, x]) for x in ids]
    return ids, [reference_hidden_states(reference, x) for x in ids]


def assert_matches(outputs, expected):
    for got, (_, want) in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def record_launches(scheduler: Scheduler, monkeypatch) -> list[tuple[int, list[Chunk]]]:
    """Records each forward the scheduler launches: how many were on the way before it, and its chunks."""
    launches, original = [], scheduler._launch

    def recording_launch(chunks):
        launches.append((len(scheduler._in_flight), chunks))
        original(chunks)

    monkeypatch.setattr(scheduler, "_launch", recording_launch)
    return launches


# A GPU node queues a forward while the previous one computes (max_in_flight 2); on a CPU, which computes as it
# launches, two in flight still run the same bookkeeping: a session on the way is neither scheduled nor preempted.
@pytest.mark.parametrize("in_flight", [1, 2])
def test_concurrent_sessions_share_forwards_and_match_the_model(model, in_flight, monkeypatch):
    span, reference = model
    ids, expected = prompts(reference, [10, 13, 17, 26, 40, 33])
    scheduler = make_scheduler(span, num_pages=128, max_batch_tokens=48, max_in_flight=in_flight)
    launches = record_launches(scheduler, monkeypatch)
    prefill = [len(x) - 8 for x in ids]  # then 8 decode steps each
    outputs = run(scheduler, *(generate(scheduler, new_session(len(x)), x, inp, p)
                               for x, (inp, _), p in zip(ids, expected, prefill)))
    assert_matches(outputs, expected)
    assert max(queued for queued, _ in launches) == in_flight - 1
    steps = sum(1 + 8 for _ in ids)
    assert scheduler.counters["forwards"] < steps, "steps of different sessions were never packed together"
    assert scheduler.pool.free_pages == 128 and not scheduler.sessions


@pytest.mark.parametrize("in_flight", [1, 2])
@pytest.mark.parametrize("swap", [False, True])
def test_preempted_sessions_resume_with_unchanged_outputs(model, swap, in_flight, monkeypatch):
    span, reference = model
    ids, expected = prompts(reference, [18, 20, 22, 19, 21, 23], seed=1)
    # 6 sessions of ~6 pages each over a pool of 14 pages: admitted by overcommit, preempted to make room; in
    # forwards of at most 4, so that another forward can be launched while one is on the way
    scheduler = make_scheduler(span, num_pages=14, overcommit=3.0, swap_bytes=2**30 if swap else 0,
                               max_batch_size=4, max_in_flight=in_flight)
    launches = record_launches(scheduler, monkeypatch)
    outputs = run(scheduler, *(generate(scheduler, new_session(len(x)), x, inp, 8)
                               for x, (inp, _) in zip(ids, expected)))
    assert_matches(outputs, expected)
    assert max(queued for queued, _ in launches) == in_flight - 1
    assert scheduler.counters["preemptions"] > 0
    assert scheduler.counters["swapped_out" if swap else "dropped"] == scheduler.counters["preemptions"]
    assert scheduler.pool.free_pages == 14 and scheduler.swap_used == 0


class SimulatedClock:
    """The scheduler's time: a forward takes `forward_seconds`, idle time passes when the test says so."""

    def __init__(self):
        self.now, self.forward_seconds = 0.0, 0.01

    def perf_counter(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_a_node_with_time_to_spare_halves_batches_until_forwards_fill_its_time(model, monkeypatch):
    """8 sessions step together. While the node idles between their steps (0.2 s, forwards of 10 ms), it computes
    each step in two forwards of 4 (the first half's outputs could travel on meanwhile); once forwards (now 0.1 s,
    a busy device) take all its time, in one forward of 8. Outputs match the model throughout. The node's time is
    simulated, so that the test does not depend on how fast this machine runs the forwards."""
    span, reference = model
    clock = SimulatedClock()
    monkeypatch.setattr(scheduler_module, "time", clock)
    original = span.forward

    def timed_forward(*args):
        clock.now += clock.forward_seconds
        return original(*args)

    monkeypatch.setattr(span, "forward", timed_forward)
    ids, expected = prompts(reference, [36] * 8, seed=9)
    scheduler = make_scheduler(span, num_pages=128)
    sessions = [new_session(36) for _ in ids]
    forwards_per_round = []

    async def lockstep():
        for session in sessions:
            await scheduler.admit(session)
        outputs = [[] for _ in sessions]
        for i, (a, b) in enumerate([(0, 4)] + [(t, t + 1) for t in range(4, 36)]):  # a prefill, 32 decode steps
            if i == 16:  # from here on the device is busy: forwards fill the node's time
                clock.forward_seconds = 0.1
            before = scheduler.counters["forwards"]
            rows = await asyncio.gather(*(scheduler.submit(s, inp[a:b], [b - a], page_keys(x, a, b))
                                          for s, x, (inp, _) in zip(sessions, ids, expected)))
            forwards_per_round.append(scheduler.counters["forwards"] - before)
            for out, r in zip(outputs, rows):
                out.append(r)
            if i < 16:
                clock.now += 0.2  # the rest of the chain works; this node idles
        return [torch.cat(out) for out in outputs]

    (outputs,) = run(scheduler, lockstep())
    assert_matches(outputs, expected)
    idle, busy = forwards_per_round[1:16], forwards_per_round[-6:]
    assert idle == [2] * len(idle), forwards_per_round
    assert busy == [1] * len(busy), forwards_per_round


def test_when_more_steps_are_ready_than_a_forward_takes_the_oldest_go_first(model, monkeypatch):
    """6 sessions decode one token a step, stepping again as soon as they are answered, through forwards of at
    most 4: each forward takes the steps that waited longest, so no session waits for others to finish."""
    span, reference = model
    monkeypatch.setattr(scheduler_module, "HALVE_BELOW", 0.0)  # forwards of 4, however idle the node is
    ids, expected = prompts(reference, [16] * 6, seed=10)
    scheduler = make_scheduler(span, num_pages=64, max_batch_size=4)
    sessions = [new_session(16) for _ in ids]
    launches = record_launches(scheduler, monkeypatch)
    outputs = run(scheduler, *(generate(scheduler, s, x, inp, 1) for s, x, (inp, _) in zip(sessions, ids, expected)))
    assert_matches(outputs, expected)
    forwards = [{sessions.index(c.session) for c in chunks} for _, chunks in launches]
    for i in range(len(sessions)):
        took = [k for k, held in enumerate(forwards) if i in held]
        assert len(took) == 16 and max(b - a for a, b in zip([-1] + took, took)) <= 2, (i, forwards)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("swap", [False, True])
def test_preemption_and_sharing_on_cuda_match_the_model(tiny_model, model, swap):
    _, reference = model
    span = Span(tiny_model("llama"), 0, 4, device="cuda")
    prefix = torch.randint(0, 500, (9,), generator=torch.Generator().manual_seed(7))
    ids, expected = prompts(reference, [9, 11, 13, 10, 12, 14], seed=8, prefix=prefix)
    # the sessions need ~20 pages at once besides the 2 they share: preemptions happen however steps are batched
    scheduler = make_scheduler(span, num_pages=10, overcommit=3.0, swap_bytes=2**30 if swap else 0)
    outputs = run(scheduler, *(generate(scheduler, new_session(len(x)), x, inp, 10)
                               for x, (inp, _) in zip(ids, expected)))
    assert_matches([out.cpu() for out in outputs], expected)
    assert scheduler.counters["preemptions"] > 0 and scheduler.counters["prefix_pages_attached"] > 0
    assert scheduler.pool.free_pages == 10


def test_batch_priority_sessions_are_preempted_first(model):
    span, reference = model
    ids, expected = prompts(reference, [20, 20, 20], seed=2)
    scheduler = make_scheduler(span, num_pages=10, overcommit=3.0)
    sessions = [new_session(20, priority=1), new_session(20), new_session(20)]
    preempted = []
    original = scheduler._preempt
    scheduler._preempt = lambda s: (preempted.append(s), original(s))
    outputs = run(scheduler, *(generate(scheduler, s, x, inp, 8) for s, x, (inp, _) in zip(sessions, ids, expected)))
    assert_matches(outputs, expected)
    assert preempted and preempted[0] is sessions[0]


def test_sessions_with_a_common_prefix_share_its_pages(model):
    span, reference = model
    prefix = torch.randint(0, 500, (22,), generator=torch.Generator().manual_seed(3))  # 5 full pages + 2 tokens
    ids, expected = prompts(reference, [3, 5, 7, 9], seed=4, prefix=prefix)
    scheduler = make_scheduler(span, num_pages=64)
    prefilled = asyncio.Barrier(len(ids) + 1)
    held = {}

    async def count_pages():
        await prefilled.wait()  # every session holds its prompt now
        held.update(pages=scheduler.pool.num_pages - scheduler.pool.free_pages)

    outputs = run(scheduler, count_pages(), *(generate(scheduler, new_session(len(x)), x, inp, len(x) - 2, prefilled)
                                             for x, (inp, _) in zip(ids, expected)))[1:]
    assert_matches(outputs, expected)
    private = sum(scheduler.pool.pages_for(len(x) - 2) - 5 for x in ids)
    assert held["pages"] == 5 + private < len(ids) * 5
    assert scheduler.counters["prefix_pages_attached"] == (len(ids) - 1) * 5


def test_a_forged_prefix_hash_does_not_share_pages(model):
    span, reference = model
    ids, expected = prompts(reference, [16, 16], seed=5)
    scheduler = make_scheduler(span, num_pages=64)
    honest, forger = new_session(16), new_session(16)
    prefilled = asyncio.Barrier(2)

    async def forge():
        await prefilled.wait()  # the honest session holds 3 full pages now
        await scheduler.admit(forger)
        out = await scheduler.submit(forger, expected[1][0], [16], page_keys(ids[0], 0, 16))  # someone else's hashes
        scheduler.close(forger)
        return out

    outputs = run(scheduler, generate(scheduler, honest, ids[0], expected[0][0], 12, prefilled), forge())
    assert_matches(outputs, expected)
    assert scheduler.counters["prefix_pages_attached"] == 0


def test_a_long_prefill_does_not_stall_decodes(model):
    span, reference = model
    ids, expected = prompts(reference, [40, 200], seed=6)
    scheduler = make_scheduler(span, num_pages=128, max_batch_tokens=24)
    decode, prefill = new_session(40), new_session(200)
    decoded_during_prefill = []

    async def long_prompt():
        while decode.seqs[0].received < 5:  # the decoding session is under way
            await asyncio.sleep(0.001)
        await scheduler.admit(prefill)
        before = decode.seqs[0].received
        out = await scheduler.submit(prefill, expected[1][0], [200], page_keys(ids[1], 0, 200))
        decoded_during_prefill.append(decode.seqs[0].received - before)
        scheduler.close(prefill)
        return out

    outputs = run(scheduler, generate(scheduler, decode, ids[0], expected[0][0], 2), long_prompt())
    assert_matches(outputs, expected)
    # the prompt takes >= 200 / 24 forwards; decodes go on in the same forwards
    assert decoded_during_prefill[0] >= 5


def test_sessions_queue_for_room_and_hear_how_long_they_waited(model):
    span, _ = model
    scheduler = make_scheduler(span, num_pages=8, overcommit=1.0, queue_timeout=5.0)
    first, second = new_session(32), new_session(32)  # each declares all 8 pages

    async def scenario():
        assert await scheduler.admit(first) == 0.0
        waiting = asyncio.create_task(scheduler.admit(second))
        await asyncio.sleep(0.3)
        assert not waiting.done() and scheduler.stats()["queued"] == 1
        scheduler.close(first)
        return await waiting

    async def refused():
        with pytest.raises(AdmissionError, match="more than the node's"):
            await scheduler.admit(new_session(33))

    waited, _ = run(scheduler, scenario(), refused())
    assert waited >= 0.3


def test_a_queued_session_is_refused_after_the_queue_timeout(model):
    span, _ = model
    scheduler = make_scheduler(span, num_pages=8, overcommit=1.0, queue_timeout=0.2)

    async def scenario():
        await scheduler.admit(new_session(32))
        with pytest.raises(AdmissionError, match="stayed full"):
            await scheduler.admit(new_session(4))
        assert not scheduler.waiting

    run(scheduler, scenario())
