"""generate(): greedy parity with transformers, stopping, sampling controls, streaming."""

import pytest
import torch
from helpers import hf_twin, random_ids, tiny_lm

from glm4 import sampling
from glm4.generation import stream_tokens
from glm4.sampling import SamplingParams


class Chars:
    """A stand-in tokenizer for stop strings: one character per id."""

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def left_padded_batch():
    ids = random_ids(3, 7, seed=1)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


def early_stopper(model, ids, mask):
    """An eos id and the step at which row 0 produces it first, while the other rows go on."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[127])
    new = out[:, ids.shape[1] :].tolist()
    for step in range(2, 8):
        token = new[0][step]
        if token not in new[0][:step] and all(token not in row[: step + 3] for row in new[1:]):
            return token, step
    raise AssertionError("no usable eos in this random model; change the seed")


def test_greedy_matches_transformers_on_left_padded_batch_with_early_stop():
    model = tiny_lm(seed=3, initializer_range=0.2)  # larger weights: less repetitive random output
    hf = hf_twin(model)
    ids, mask = left_padded_batch()
    eos, step = early_stopper(model, ids, mask)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0)
    ref = hf.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[eos], pad_token_id=0
    )
    assert torch.equal(ours, ref)
    assert ours[0, 7 + step] == eos and (ours[0, 7 + step + 1 :] == 0).all()  # row 0 stopped, then pads
    assert ours.shape[1] >= 7 + step + 3  # the others went on


def test_greedy_matches_transformers_with_repetition_penalty():
    model = tiny_lm(seed=4)
    hf = hf_twin(model)
    ids, mask = left_padded_batch()
    kwargs = dict(
        attention_mask=mask, max_new_tokens=10, repetition_penalty=1.3, eos_token_id=[127], pad_token_id=0
    )
    assert torch.equal(model.generate(ids, **kwargs), hf.generate(ids, do_sample=False, **kwargs))


def test_default_eos_comes_from_config_and_generation_config(tmp_path):
    model = tiny_lm()
    ids = random_ids(1, 5)
    out = model.generate(ids, max_new_tokens=20)
    stops = set(model.config.eos_token_ids)
    new = out[0, 5:].tolist()
    assert not stops.intersection(new[:-1])  # it ran until a config eos id or the budget
    model.generation_config = {"eos_token_id": [new[0]]}
    assert model.generate(ids, max_new_tokens=20).shape[1] == 6


def test_stop_strings():
    model = tiny_lm(seed=5)
    ids = random_ids(1, 4)
    full = model.generate(ids, max_new_tokens=15, eos_token_id=[127])
    text = Chars().decode(full[0, 4:].tolist())
    stop = text[5:7]
    cut = model.generate(ids, max_new_tokens=15, eos_token_id=[127], stop_strings=[stop], tokenizer=Chars())
    assert Chars().decode(cut[0, 4:].tolist()).endswith(stop)
    assert cut.shape[1] == 4 + text.index(stop) + len(stop)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        model.generate(ids, stop_strings=["x"])


def test_sampling_is_seeded_and_reproducible():
    model = tiny_lm()
    ids = random_ids(2, 5)
    kwargs = dict(do_sample=True, temperature=1.5, max_new_tokens=12, eos_token_id=[127])
    a = model.generate(ids, seed=7, **kwargs)
    assert torch.equal(a, model.generate(ids, seed=7, **kwargs))
    assert not torch.equal(a, model.generate(ids, seed=8, **kwargs))


def test_streamer_sees_every_step():
    model = tiny_lm()
    ids = random_ids(1, 5)
    steps = []
    out = model.generate(ids, max_new_tokens=6, eos_token_id=[127], streamer=steps.append)
    assert torch.equal(torch.stack(steps, 1), out[:, 5:])


def test_prompt_longer_than_context_is_a_clear_error():
    model = tiny_lm()  # context 64
    with pytest.raises(ValueError, match="prompt has 64 tokens but the model's context is 64"):
        list(stream_tokens(model, random_ids(1, 64)))
    # A budget past the context is cut to what fits.
    assert len(list(stream_tokens(model, random_ids(1, 60), max_new_tokens=50, eos_token_id=[]))) == 4


# -- sampling functions ---------------------------------------------------------------------------


def test_top_k_keeps_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = sampling.top_k(logits, 2)
    assert torch.isfinite(kept).sum() == 2 and torch.isfinite(kept[0, [1, 3]]).all()


def test_top_p_keeps_the_smallest_set_over_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(sampling.top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(sampling.top_p(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(sampling.top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(sampling.top_p(logits, 0.01)).sum() == 1  # always at least one


def test_min_p_drops_unlikely_tokens():
    probs = torch.tensor([[0.6, 0.3, 0.08, 0.02]])
    assert torch.isfinite(sampling.min_p(probs.log(), 0.1)).tolist() == [[True, True, True, False]]


def test_repetition_and_presence_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = sampling.repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    counts = torch.tensor([[0.0, 2.0, 1.0]])
    out = sampling.presence_frequency_penalty(logits, counts, 0.5, 0.25)
    assert out.tolist() == [[2.0, -3.0, 0.25]]


def test_temperature_zero_is_argmax_and_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 3.0]])
    assert sampling.sample_next(logits, SamplingParams(do_sample=True, temperature=0)).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [sampling.sample_next(logits, SamplingParams(do_sample=True), generator=g) for _ in range(2000)]
    )
    freq = torch.bincount(draws.flatten(), minlength=3).float() / 2000
    assert torch.allclose(freq, logits.softmax(-1)[0], atol=0.03)
    top1 = SamplingParams(do_sample=True, top_k=1)
    assert all(sampling.sample_next(logits, top1, generator=g).item() == 2 for _ in range(20))


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)


def test_overlap_gives_the_same_tokens_as_the_serial_loop():
    """One step ahead (`overlap=True`), every control that reads the tokens on the host or carries
    state from step to step gives the serial loop's output: a row stopping at eos while the others go
    on (then pads), stop strings, repetition/presence/frequency penalties, seeded sampling, the
    budget; through stream_tokens and generate, on the module, on the compiled step and on a
    dynamic cache."""

    model = tiny_lm(seed=3, initializer_range=0.2)
    ids, mask = left_padded_batch()
    eos, step = early_stopper(model, ids, mask)
    stop = Chars().decode(model.generate(ids[1:2], max_new_tokens=9, eos_token_id=[eos])[0, 7:].tolist())[4:6]
    cases = [
        dict(eos_token_id=[eos], pad_token_id=0),
        dict(eos_token_id=[eos], pad_token_id=0, compile=True),
        dict(eos_token_id=[eos], pad_token_id=0, cache="dynamic"),
        dict(eos_token_id=[127], stop_strings=[stop], tokenizer=Chars()),
        dict(eos_token_id=[eos], repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
        dict(eos_token_id=[eos], do_sample=True, temperature=1.5, top_k=20, seed=7),
    ]
    for kwargs in cases:
        serial = model.generate(ids, attention_mask=mask, max_new_tokens=12, **kwargs)
        ahead = model.generate(ids, attention_mask=mask, max_new_tokens=12, overlap=True, **kwargs)
        assert torch.equal(ahead, serial), kwargs
    assert serial.shape[1] > 7 + 4  # the sampled case ran a while
    for n in (1, 2, 5):  # the budget, streamed
        serial = list(stream_tokens(model, ids, mask, max_new_tokens=n, eos_token_id=[]))
        ahead = list(stream_tokens(model, ids, mask, max_new_tokens=n, eos_token_id=[], overlap=True))
        assert len(ahead) == n and torch.equal(torch.stack(ahead), torch.stack(serial))


def test_overlap_queues_each_step_before_reading_the_token_it_takes(monkeypatch):
    """The order of work with `overlap=True`: from the second token on, the token's copy to the host
    starts, the step that consumes it is called, and only then is the copy read; the first and the
    last token are read before (no step follows the last). Every token comes as the host's copy.
    The serial loop reads every token before its step. A stop costs one step whose logits go unused."""
    from glm4 import generation

    model = tiny_lm(seed=3, initializer_range=0.2)  # larger weights: less repetitive random output
    events: list[str] = []
    decode_step = model.decode_step

    def logged_step(*args):
        events.append("step")
        return decode_step(*args)

    def logged_copy(tensor):
        events.append("copy")
        copy = tensor.clone()
        copy.from_host_copy = True
        return lambda: events.append("read") or copy

    monkeypatch.setattr(model, "decode_step", logged_step)
    monkeypatch.setattr(generation, "host_copy", logged_copy)
    first = list(stream_tokens(model, random_ids(1, 5), max_new_tokens=4, eos_token_id=[], compile=False))
    assert events == ["step"] * 3
    events.clear()
    ahead = list(stream_tokens(model, random_ids(1, 5), max_new_tokens=4, eos_token_id=[], compile=False,
                               overlap=True))  # fmt: skip
    assert events == ["copy", "read", "step", "copy", "step", "read", "copy", "step", "read", "copy", "read"]
    assert torch.equal(torch.stack(ahead), torch.stack(first))
    assert all(getattr(t, "from_host_copy", False) for t in ahead)  # every token: the host's copy
    events.clear()
    ids = [int(t) for t in first]
    j = next(j for j in range(1, 4) if ids[j] not in ids[:j])  # stop at the token after ids[j - 1]
    stopped = list(stream_tokens(model, random_ids(1, 5), max_new_tokens=4, eos_token_id=[ids[j]],
                                 compile=False, overlap=True))  # fmt: skip
    expected = ["copy", "read", "step"] + ["copy", "step", "read"] * j  # the last step unused
    assert len(stopped) == j + 1 and events == expected


def test_host_copy_on_cuda_waits_for_its_copy_only(monkeypatch):
    """On CUDA the token goes to the host without blocking, and an event recorded right after the
    copy is what reading it waits for (not the stream, which holds the next step by then). Checked
    with stand-ins for the tensor and the event, as no GPU is at hand."""
    from glm4 import generation

    log: list[str] = []

    class Event:
        def record(self):
            log.append("record")

        def synchronize(self):
            log.append("synchronize")

    class OnCuda:
        device = torch.device("cuda")

        def to(self, device, non_blocking=False):
            log.append(f"to {device} non_blocking={non_blocking}")
            return "the copy"

    monkeypatch.setattr(torch.cuda, "Event", Event)
    read = generation.host_copy(OnCuda())
    assert log == ["to cpu non_blocking=True", "record"]
    assert read() == "the copy" and log[-1] == "synchronize"
    cpu = torch.tensor([3, 4])
    assert torch.equal(generation.host_copy(cpu)(), cpu)


def test_a_model_without_pad_generates_without_stop_tokens():
    """No pad token in config.json and no eos asked for: nothing to pad with, and nothing needs it."""
    model = tiny_lm()
    model.config.pad_token_id = None
    ids = random_ids(2, 5)
    out = model.generate(ids, max_new_tokens=3, eos_token_id=[], compile=False)
    assert out.shape == (2, 8)
