"""The client's own decode loop (client/generation.py) against transformers' generate on the same local model."""

import asyncio

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
)

from client.generation import decode, lean_settings

PROMPT = torch.tensor([[5, 17, 33, 8, 90, 41, 7], [12, 3, 77, 64, 9, 21, 50]])


class Recorder:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.fixture(scope="module")
def local(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    with torch.no_grad():  # a random tiny model's next-token distribution is nearly flat: sharpen it, so that
        model.lm_head.weight.mul_(30)  # temperature, top-k and top-p change which tokens are drawn
    return model


def local_decode(model, prompt, attention_mask, settings, *streamer_and_criteria):
    """decode() with steps that run the whole sequence through a local model."""
    async def last_logits(ids, mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]

    return asyncio.run(decode(last_logits, prompt, attention_mask, settings, *streamer_and_criteria))


def first_greedy_token(local, row: int, step: int) -> int:
    return local.generate(PROMPT, max_new_tokens=step + 1, do_sample=False)[row, PROMPT.shape[1] + step].item()


@pytest.mark.parametrize("case", [
    dict(max_new_tokens=10, do_sample=False),
    dict(max_new_tokens=24, do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
    dict(max_new_tokens=24, do_sample=True, temperature=1.6),
    dict(max_new_tokens=24, do_sample=True, top_p=0.5),
    dict(max_new_tokens=24, do_sample=True),  # transformers' default top_k of 50
    dict(max_length=12, do_sample=False),
])
def test_decode_matches_transformers_generate(local, case):
    settings = lean_settings(local.generation_config, PROMPT, case)
    assert settings is not None
    torch.manual_seed(3)
    expected = local.generate(PROMPT, **case)
    torch.manual_seed(3)
    assert torch.equal(local_decode(local, PROMPT, None, settings), expected)


def test_eos_ends_each_row_and_pads_it_as_transformers_does(local):
    eos = first_greedy_token(local, row=0, step=2)  # row 0 ends at its third token
    case = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ours = local_decode(local, PROMPT, torch.ones_like(PROMPT), lean_settings(local.generation_config, PROMPT, case))
    assert torch.equal(ours, local.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **case))
    assert ours[0, PROMPT.shape[1] + 3:].eq(0).all()

    # min_new_tokens holds EOS back until it is reached
    held = dict(case, min_new_tokens=6)
    ours = local_decode(local, PROMPT, None, lean_settings(local.generation_config, PROMPT, held))
    assert torch.equal(ours, local.generate(PROMPT, **held))
    assert eos not in ours[0, PROMPT.shape[1]:PROMPT.shape[1] + 6].tolist()

    # generation stops once every row has ended
    ours = local_decode(local, PROMPT[:1], None, lean_settings(local.generation_config, PROMPT[:1], case))
    assert torch.equal(ours, local.generate(PROMPT[:1], **case))
    assert ours.shape[1] <= PROMPT.shape[1] + 3


class EndRowAt(StoppingCriteria):
    """Ends one row once the sequence reaches a length."""

    def __init__(self, row: int, length: int):
        self.row, self.length = row, length

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] >= self.length
        return done


def test_stopping_criteria_end_rows_as_in_transformers(local):
    case = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    length = PROMPT.shape[1]
    for criteria in ([EndRowAt(0, length + 3)], [EndRowAt(0, length + 3), EndRowAt(1, length + 5)]):
        ours = local_decode(local, PROMPT, None, lean_settings(local.generation_config, PROMPT, case), None, criteria)
        assert torch.equal(ours, local.generate(PROMPT, stopping_criteria=StoppingCriteriaList(criteria), **case))
    assert ours.shape[1] == length + 5  # generation ends once every row has ended


def test_the_streamer_gets_what_transformers_gives_it(local):
    case = dict(max_new_tokens=5, do_sample=False)
    ours, theirs = Recorder(), Recorder()
    local_decode(local, PROMPT[:1], None, lean_settings(local.generation_config, PROMPT[:1], case), ours)
    local.generate(PROMPT[:1], streamer=theirs, **case)
    assert ours.ended and theirs.ended
    assert [p.tolist() for p in ours.puts] == [p.tolist() for p in theirs.puts]


def test_other_settings_go_to_transformers_generate(local):
    plain = dict(max_new_tokens=4, do_sample=False)
    assert lean_settings(local.generation_config, PROMPT, plain) is not None
    assert lean_settings(local.generation_config, PROMPT, dict(plain, stopping_criteria=[EndRowAt(0, 9)])) is not None
    for extra in (dict(repetition_penalty=1.3), dict(num_beams=2), dict(return_dict_in_generate=True),
                  dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])),
                  dict(eos_token_id=torch.tensor([2])), dict(eos_token_id=None)):
        assert lean_settings(local.generation_config, PROMPT, {**plain, **extra}) is None, extra
    # the model's own generation config counts too
    beams = GenerationConfig.from_dict({**local.generation_config.to_dict(), "num_beams": 2})
    assert lean_settings(beams, PROMPT, plain) is None
    # without an attention mask, transformers infers one from padding in the prompt
    padded = PROMPT.clone()
    padded[0, 0] = 0
    assert lean_settings(local.generation_config, padded, dict(plain, pad_token_id=0)) is None
    assert lean_settings(local.generation_config, padded, dict(plain, pad_token_id=0,
                                                               attention_mask=torch.ones_like(padded))) is not None

