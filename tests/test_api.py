"""`swarm api` driven by the official openai package, and `swarm generate` / `swarm chat`, against a loopback
swarm: the text equals what the client library generates for the same greedy request."""

import subprocess
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoTokenizer

from client import DistributedModelForCausalLM
from client.cli import render
from conftest import free_port
from local_swarm import SWARM

PROMPT = "A swarm of volunteer machines"
NEW_TOKENS = 12


def library_text(model, tokenizer, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> str:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run_cli(local_swarm, path, *args: str, stdin: str | None = None) -> str:
    done = subprocess.run([*SWARM, *args, "--model", str(path), "--max-new-tokens", str(NEW_TOKENS),
                           "--initial-peers", *local_swarm.initial_peers], input=stdin, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_openai_api_and_cli_give_the_client_librarys_text(tiny_model, local_swarm):
    path = tiny_model("llama")
    local_swarm.start_nodes(path, [(0, 2), (2, 4)])
    url = local_swarm.start_api(path, free_port())
    api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    name = path.name
    tokenizer = AutoTokenizer.from_pretrained(path)
    conversation = [{"role": "user", "content": "Where do the blocks live?"}]
    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers) as model:
        expected = library_text(model, tokenizer, tokenizer(PROMPT, return_tensors="pt").input_ids)
        expected_chat = library_text(model, tokenizer, render(tokenizer, conversation))
        second_turn = [*conversation, {"role": "assistant", "content": expected_chat},
                       {"role": "user", "content": "And the cache?"}]
        expected_second = library_text(model, tokenizer, render(tokenizer, second_turn))
    assert expected.strip() and expected_chat.strip()

    assert [m.id for m in api.models.list().data] == [name]

    completion = api.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens <= NEW_TOKENS and completion.usage.prompt_tokens > 0
    streamed = api.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == expected

    chat = api.chat.completions.create(model=name, messages=conversation, max_tokens=NEW_TOKENS, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == expected_chat
    streamed = api.chat.completions.create(model=name, messages=conversation, max_tokens=NEW_TOKENS, temperature=0,
                                           stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == expected_chat

    # concurrent requests share the swarm and each gets its own session
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: api.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                                               temperature=0).choices[0].text, range(4)))
    assert texts == [expected] * 4

    stop = next(expected[i:i + 2] for i in range(1, len(expected) - 1) if expected[i:i + 2].strip())
    stopped = api.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0, stop=[stop])
    assert stopped.choices[0].text == expected[:expected.index(stop)] and stopped.choices[0].finish_reason == "stop"
    sampled = api.completions.create(model=name, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0.8, top_p=0.9)
    assert sampled.usage.completion_tokens >= 1

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model=name, prompt=PROMPT, temperature=7)

    assert run_cli(local_swarm, path, "generate", PROMPT) == expected + "\n"
    # a second turn continues the conversation's session and gives what a fresh generate over it gives
    turns = f"{conversation[0]['content']}\n{second_turn[2]['content']}\n"
    assert run_cli(local_swarm, path, "chat", stdin=turns) == f"{expected_chat}\n{expected_second}\n"


def sentencepiece_tokenizer():
    """A SentencePiece-style BPE (the ▁ word marker, as Llama 2 and Mistral use), trained here."""
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(["A swarm of volunteer machines serves café models", "naïve 中文 text, emoji 🐝!",
                             "Once upon a time, in a land far away"], vocab_size=200, special_tokens=["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_text_is_the_whole_decode(kind):
    """The API's text of a growing completion, decoded a few tokens at a time, is always a prefix of decoding
    every token so far, and ends equal to it; also across partial characters and special tokens."""
    from client.api import _Detokenizer
    from make_tiny_model import make_tokenizer

    tokenizer = make_tokenizer() if kind == "byte-level" else sentencepiece_tokenizer()
    sample = "A swarm of volunteer machines: naïve café, 中文 and 🐝. Once upon a time"
    generator = torch.Generator().manual_seed(0)
    sequences = [tokenizer(sample).input_ids]  # whole characters
    sequences += [torch.randint(len(tokenizer), (60,), generator=generator).tolist() for _ in range(20)]
    for tokens in sequences:
        text = _Detokenizer(tokenizer)
        position = 0
        while position < len(tokens):
            step = 1 + position % 3
            text.add(tokens[position:position + step])
            position += step
            assert tokenizer.decode(tokens[:position], skip_special_tokens=True).startswith(text.text)
        text.finish()
        assert text.text == tokenizer.decode(tokens, skip_special_tokens=True)
