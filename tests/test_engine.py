"""The continuous-batching engine: batched greedy equals alone, queueing, timeouts, cancellation."""

import threading
import time

import torch
from helpers import attention_widths, random_ids, tiny_lm

from glm4.engine import Engine, Finished
from glm4.sampling import SamplingParams

GREEDY = SamplingParams()


def tokens_of(stream):
    out = list(stream)
    assert isinstance(out[-1], Finished)
    return out[:-1], out[-1]


def test_engine_greedy_equals_generate_alone_and_batched():
    model = tiny_lm(seed=1, initializer_range=0.2, max_position_embeddings=128)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 5, 9, 4, 6)]
    expected = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=10, eos_token_id=[], compile=False)
        expected.append(out[0, len(p) :].tolist())
    engine = Engine(model, max_batch_size=4, compile=False)
    try:
        alone = [tokens_of(engine.generate(p, GREEDY, 10, set()))[0] for p in prompts]
        assert alone == expected
        # All at once: 6 requests in 4 slots, joining and leaving the running batch.
        results = [None] * len(prompts)

        def run(i):
            results[i] = tokens_of(engine.generate(prompts[i], GREEDY, 10 if i % 2 else 4 + i, set()))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (tokens, finished) in enumerate(results):
            n = 10 if i % 2 else 4 + i
            assert (
                tokens == expected[i][:n] and finished.reason == "length" and finished.completion_tokens == n
            )
    finally:
        engine.shutdown()


def test_stop_ids_and_seeded_sampling():
    model = tiny_lm(seed=1, initializer_range=0.2)
    engine = Engine(model, max_batch_size=2, compile=False)
    try:
        prompt = random_ids(1, 5)[0].tolist()
        tokens, _ = tokens_of(engine.generate(prompt, GREEDY, 8, set()))
        stopped, finished = tokens_of(engine.generate(prompt, GREEDY, 8, {tokens[3]}))
        assert stopped == tokens[: tokens.index(tokens[3])] and finished.reason == "stop"
        sampled = SamplingParams(do_sample=True, temperature=1.5)
        a = tokens_of(engine.generate(prompt, sampled, 12, set(), seed=3))[0]
        assert a == tokens_of(engine.generate(prompt, sampled, 12, set(), seed=3))[0]
        assert a != tokens_of(engine.generate(prompt, sampled, 12, set(), seed=4))[0]
    finally:
        engine.shutdown()


def test_queue_timeout_and_cancellation_free_the_slot():
    model = tiny_lm(seed=1, max_position_embeddings=4096)
    engine = Engine(model, max_batch_size=1, queue_timeout=0.2, compile=False)
    try:
        got = []
        busy = engine.submit(random_ids(1, 4)[0].tolist(), GREEDY, 3000, set(), got.append)
        waiting = list(engine.generate(random_ids(1, 4)[0].tolist(), GREEDY, 5, set()))
        assert waiting == [Finished("timeout", 0)]
        busy.cancel()
        tokens, finished = tokens_of(engine.generate(random_ids(1, 4)[0].tolist(), GREEDY, 5, set()))
        assert len(tokens) == 5 and finished.reason == "length"
        assert isinstance(got[-1], Finished) and got[-1].reason == "cancelled"
        assert not engine.active
    finally:
        engine.shutdown()


def test_prompt_longer_than_the_context_is_refused():
    engine = Engine(tiny_lm(), max_batch_size=1, max_model_len=16, compile=False)
    try:
        import pytest

        with pytest.raises(ValueError, match="prompt has 16 tokens but the context is 16"):
            engine.submit(list(range(4, 20)), GREEDY, 4, set(), print)
        tokens, finished = tokens_of(engine.generate(list(range(4, 14)), GREEDY, 100, set()))
        assert finished.reason == "length" and len(tokens) + 10 <= 16
    finally:
        engine.shutdown()


def test_engine_steps_attend_over_the_longest_filled_slot(monkeypatch):
    model = tiny_lm(seed=1, initializer_range=0.2, max_position_embeddings=128)
    widths = attention_widths(monkeypatch)
    engine = Engine(model, max_batch_size=2, compile=False)  # 128 positions a slot
    try:
        tokens_of(engine.generate(random_ids(1, 5)[0].tolist(), GREEDY, 4, set()))
    finally:
        engine.shutdown()
    layers = model.config.num_hidden_layers
    assert widths == [w for w in (6, 7, 8) for _ in range(layers)]


def test_compiled_engine_equals_eager_with_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_lm(seed=1, initializer_range=0.2, max_position_embeddings=128)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 7)]
    results = {}
    for compile in (False, True):
        engine = Engine(model, max_batch_size=2, compile=compile)
        before = counters["stats"]["unique_graphs"]
        try:
            outs = [None, None]

            def run(i, engine=engine, outs=outs):
                outs[i] = tokens_of(engine.generate(prompts[i], GREEDY, 12, set()))[0]

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[compile] = outs
        finally:
            engine.shutdown()
        graphs = counters["stats"]["unique_graphs"] - before
        assert graphs == (1 if compile else 0)  # one graph for steps of every width
    assert results[True] == results[False]


def test_engine_start_releases_the_loading_threads_openmp_workers(monkeypatch):
    """The loading thread's idle OpenMP team would make libgomp stop spinning the engine's workers
    (more managed threads than CPUs), which doubled the time of every decode step on 2 cores."""
    import os

    import pytest

    import glm4.engine

    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no OpenMP team to release")

    def tasks() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    # A fresh thread's first parallel region starts a team of its own: its workers are the threads
    # that appear then (other tests' threads may come and go meanwhile, so count only these). The
    # thread stays alive while they are counted: a thread's team also ends when the thread does.
    seen: dict[str, object] = {}
    released, checked = threading.Event(), threading.Event()

    def load_then_release() -> None:
        before = tasks()
        a = torch.randn(512, 512)
        _ = a @ a
        seen["workers"] = tasks() - before
        seen["released"] = glm4.engine.release_openmp_workers()
        released.set()
        checked.wait(10)

    thread = threading.Thread(target=load_then_release)
    thread.start()
    try:
        assert released.wait(10)
        assert seen["released"] and len(seen["workers"]) >= torch.get_num_threads() - 1
        deadline = time.monotonic() + 2
        while seen["workers"] & tasks():
            assert time.monotonic() < deadline, "the workers did not exit"
            time.sleep(0.01)
    finally:
        checked.set()
        thread.join()

    calls = []
    monkeypatch.setattr(glm4.engine, "release_openmp_workers", lambda: calls.append(1) or True)
    Engine(tiny_lm(), max_batch_size=1, compile=False).shutdown()
    assert calls == [1]  # before its thread starts
