"""Many concurrent sessions through a real 2-node swarm: batching, oversubscription and prefix sharing stay exact."""

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.remote import run_coroutine
from client.session import InferenceSession, SpanSession
from conftest import assert_same_tokens
from swarm import protocol
from swarm.routing import Hop

PAGE_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 kv heads x head dim 16 x fp32


def random_prompts(lengths, seed=0, prefix=()):
    generator = torch.Generator().manual_seed(seed)
    return [torch.tensor([*prefix, *torch.randint(1, 500, (n,), generator=generator).tolist()])[None] for n in lengths]


def generate_concurrently(model, prompts, new_tokens):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: greedy(model, ids, new_tokens), prompts))


def greedy(model, ids, new_tokens):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)


def node_stats(model):
    records = run_coroutine(model.connection.records(model.swarm_model_name))
    return {r.start: run_coroutine(model.connection.node_stats(r.peer_id)) for r in records}


def assert_all_match_local(swarm_outputs, prompts, local, new_tokens):
    for ids, got in zip(prompts, swarm_outputs):
        assert_same_tokens(got, greedy(local, ids, new_tokens), local)


def test_twelve_concurrent_sessions_match_local_greedy(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--model-name", "concurrent-llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([3, 5, 8, 11, 14, 17, 20, 25, 31, 40, 52, 70])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="concurrent-llama") as model:
        outputs = generate_concurrently(model, prompts, new_tokens=16)
        stats = node_stats(model)
        batcher = model.step_batcher
    assert_all_match_local(outputs, prompts, local, 16)
    for node in stats.values():  # 12 prefills and 12 x 15 decodes per node, far fewer forwards
        assert node["forwards"] < 12 * 16 and node["sessions"] == 0 and node["pages_used"] == 0
    # the client's part of the decode steps, too: the calls' steps shared its forwards
    assert batcher.rows == 12 * 15 and batcher.forwards < batcher.rows / 2


def test_a_step_that_fails_in_a_shared_forward_fails_only_its_own_call(tiny_model, local_swarm):
    """Decode steps taken in one event-loop turn run the client's part as one forward: a step whose session
    refuses it (a token past its max_length) gets that error, and the other step gets the local model's logits."""
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--model-name", "shared-forward-llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 42, 7, 99]])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="shared-forward-llama") as model:
        def session(max_length):
            return InferenceSession(model.connection, model.swarm_model_name, model.num_blocks, max_length)

        with session(8) as roomy, session(4) as full, torch.no_grad():
            for s in (roomy, full):  # llama's embeddings are the decoder stack's input
                s.step(model.get_input_embeddings()(prompt[:, :4]))

            async def steps_in_one_turn():
                return await asyncio.gather(*(last_token_step(model, s, prompt) for s in (roomy, full)),
                                            return_exceptions=True)

            logits, error = run_coroutine(steps_in_one_turn())
            assert (roomy.lengths, full.lengths) == ([5], [4])
        assert model.step_batcher.forwards == 1 and model.step_batcher.rows == 2
    assert isinstance(error, ValueError) and "max_length 4" in str(error)
    with torch.no_grad():
        torch.testing.assert_close(logits, local(prompt).logits[:, -1], rtol=1e-4, atol=1e-4)


def test_a_cancelled_call_stops_its_own_step_in_a_shared_forward(tiny_model, local_swarm):
    """A generate() call interrupted while it waits for its step (Ctrl-C) takes no step when its forward has not
    begun, and stops its session's step when it has; the other call's step goes on."""
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--model-name", "cancelled-llama")
    prompt = torch.tensor([[5, 17, 42, 7, 99]])
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="cancelled-llama") as model:
        batcher = model.step_batcher
        sessions = [InferenceSession(model.connection, model.swarm_model_name, model.num_blocks, 8) for _ in range(4)]
        with contextlib.ExitStack() as stack, torch.no_grad():
            for s in sessions:
                stack.enter_context(s).step(model.get_input_embeddings()(prompt[:, :4]))

            async def cancel_one(kept, cancelled, in_flight: bool):
                kept, cancelled = (asyncio.ensure_future(last_token_step(model, s, prompt)) for s in (kept, cancelled))
                forwards = batcher.forwards
                await asyncio.sleep(0)  # both steps wait for their forward
                while in_flight and batcher.forwards == forwards:
                    await asyncio.sleep(0)
                cancelled.cancel()
                await kept
                return cancelled.cancelled()

            assert run_coroutine(cancel_one(*sessions[:2], in_flight=False))
            assert [s.lengths for s in sessions[:2]] == [[5], [4]] and batcher.rows == 1
            assert run_coroutine(cancel_one(*sessions[2:], in_flight=True))
            assert [s.lengths for s in sessions[2:]] == [[5], [4]] and batcher.rows == 3


def last_token_step(model, session, prompt):
    """The logits of prompt's last token, stepped through session as a decode step of the model's batcher."""
    n = prompt.shape[1] - 1
    return model.step_batcher.logits(session, prompt[:, n:], torch.tensor([[n]]), [1], [prompt[0, n:].tolist()])



def test_more_concurrent_calls_than_the_client_loop_has_threads_finish(tiny_model, local_swarm, monkeypatch):
    """40 calls at once, more than any event loop's default executor has threads (32 at most), with every
    hidden state compressed in a thread: forwards that wait on the client's loop take none of the threads the
    loop needs for that, so all calls finish, with the local model's tokens."""
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--model-name", "many-calls-llama")
    monkeypatch.setattr(protocol, "THREAD_BYTES", 0)  # the client compresses even a decode step in a thread
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([8 + i % 5 for i in range(40)], seed=4)
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="many-calls-llama", compress=True) as model:
        outputs = generate_concurrently(model, prompts, new_tokens=4)
    assert_all_match_local(outputs, prompts, local, 4)

def test_a_pool_for_four_sessions_serves_sixteen_with_preemptions(tiny_model, local_swarm):
    path = tiny_model("llama")
    # each session holds at most 18 + 24 tokens = 3 pages; the pools have 12 pages, admission overcommits 4x
    pool = ["--kv-cache-gb", str(12.5 * PAGE_BYTES / 2**30), "--kv-overcommit", "4"]
    local_swarm.start_nodes(path, [(0, 2)], *pool, "--swap-gb", "0.01", "--model-name", "crowded-llama")
    local_swarm.start_nodes(path, [(2, 4)], *pool, "--swap-gb", "0", "--model-name", "crowded-llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([4 + i for i in range(16)], seed=1)
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="crowded-llama") as model:
        outputs = generate_concurrently(model, prompts, new_tokens=24)
        stats = node_stats(model)
    assert_all_match_local(outputs, prompts, local, 24)
    swapping, recomputing = stats[0], stats[2]
    assert swapping["pages_total"] == recomputing["pages_total"] == 12
    assert swapping["preemptions"] > 0 and swapping["swapped_out"] == swapping["preemptions"]
    assert recomputing["preemptions"] > 0 and recomputing["dropped"] == recomputing["preemptions"]
    assert recomputing["recomputed_tokens"] > 0


def test_eight_sessions_with_a_common_prefix_share_its_pages(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)], "--model-name", "prefix-llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = torch.randint(1, 500, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    prompts = random_prompts([3, 4, 5, 6, 7, 8, 9, 10], seed=3, prefix=prefix)
    new_tokens = 8
    held, release = threading.Barrier(len(prompts) + 1), threading.Barrier(len(prompts) + 1)

    def generate_and_hold(ids):
        with model.inference_session(max_length=ids.shape[1] + new_tokens):
            out = greedy(model, ids, new_tokens)
            held.wait()  # every session keeps its cache until the pages are counted
            release.wait()
        return out

    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="prefix-llama") as model:
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(generate_and_hold, ids) for ids in prompts]
            held.wait()
            stats = node_stats(model)
            release.wait()
            outputs = [f.result() for f in futures]
    assert_all_match_local(outputs, prompts, local, new_tokens)
    prefix_pages = 200 // 16
    # each node holds prompt + new_tokens - 1 tokens per session: the prefix's full pages once, the rest privately
    private = sum(-(-(ids.shape[1] + new_tokens - 1) // 16) - prefix_pages for ids in prompts)
    for node in stats.values():
        assert node["pages_used"] == prefix_pages + private < len(prompts) * prefix_pages
        assert node["pages_shared"] == prefix_pages
        assert node["prefix_pages_attached"] == (len(prompts) - 1) * prefix_pages


def test_an_open_queued_for_cache_room_holds_up_no_other_session_on_the_clients_stream(tiny_model, local_swarm):
    path = tiny_model("llama")
    # a pool of 4 pages of 4 blocks; a 64-token session declares all of them, and admission does not overcommit
    local_swarm.start_nodes(path, [(0, 4)], "--kv-cache-gb", str(4.5 * 2 * PAGE_BYTES / 2**30), "--kv-overcommit", "1",
                            "--model-name", "small-pool-llama")
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                     model_name_in_swarm="small-pool-llama") as model:
        [record] = run_coroutine(model.connection.records(model.swarm_model_name))
        hidden_size = model.config.hidden_size

        async def open_span() -> SpanSession:
            return await SpanSession.open(model.connection, Hop(record, 0, 4), max_length=64, batch_size=1)

        async def scenario() -> None:
            first = await open_span()
            first.pusher = None  # its steps travel on the stream that carries the queued open
            second = asyncio.create_task(open_span())
            for n in (5, 1, 1):
                assert (await first.step(torch.randn(n, hidden_size), [n])).shape == (n, hidden_size)
            assert not second.done()  # still waiting for room
            await first.close()
            second = await asyncio.wait_for(second, 30)
            assert second.link is first.link and second.queued_s > 0
            assert (await second.step(torch.randn(3, hidden_size), [3])).shape == (3, hidden_size)
            await second.close()

        run_coroutine(scenario())
