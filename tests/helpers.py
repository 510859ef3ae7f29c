"""Tiny models for tests: our model and transformers' on the same random weights."""

from __future__ import annotations

import socket

import torch

from glm4 import Glm4Config, Glm4ForCausalLM

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    eos_token_id=[1, 2, 3],
)


def tiny_config(**overrides) -> Glm4Config:
    return Glm4Config(**{**TINY, **overrides})


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move norm weights and biases off their init (ones, zeros) so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def hf_config(config: Glm4Config):
    import transformers

    return transformers.Glm4Config(**config.to_dict())


def hf_twin(model: torch.nn.Module, hf_class_name: str = "Glm4ForCausalLM"):
    """The transformers model of the same class with our weights."""
    import transformers

    hf = getattr(transformers, hf_class_name)(hf_config(model.config))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k for k in missing), missing
    # Rope frequencies stay float32, as transformers' from_pretrained leaves them in any dtype (its
    # `.to` would round them; glm4's keeps them).
    frequencies = {name: t for name, t in hf.named_buffers() if name.endswith("inv_freq")}
    hf = hf.to(model.dtype)
    for name, t in frequencies.items():
        owner, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(owner), attr, t)
    return hf.eval()


def tiny_lm(seed: int = 0, **overrides) -> Glm4ForCausalLM:
    torch.manual_seed(seed)
    return perturb(Glm4ForCausalLM(tiny_config(**overrides)), seed).eval()


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 0, low: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, length), generator=g)


CORPUS = [
    "Hello world! The capital of France is Paris. 你好，世界！北京是中国的首都。",
    "def add(a, b):\n    return a + b  # code 🙂🚀 emoji\n\n\n    indented\ttabs",
    'What is the weather in Paris? get_weather {"city": "Paris"} 1234567 + 89 = 1234656',
    "可用工具 在调用上述函数时，请使用 Json 格式表示调用的参数。 <think> reasoning </think> answer",
]


def build_test_tokenizer_folder(folder, chat_template: str | None = "glm4"):
    """A tiny GLM-layout tokenizer (BPE + GLM special tokens) saved with a chat template."""
    from glm4.demo.tokenizer import build_tokenizer
    from glm4.tokenizer import Glm4Tokenizer, builtin_template

    template = builtin_template(chat_template) if chat_template else None
    tok = Glm4Tokenizer(
        build_tokenizer(CORPUS * 3, vocab_size=400),
        template,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    )
    tok.save_pretrained(folder)
    return tok


def build_tiny_checkpoint(folder, chat_template: str = "glm4", seed: int = 0, context: int = 512):
    """A random tiny GLM-4 model with the test tokenizer, saved as one checkpoint folder."""
    tok = build_test_tokenizer_folder(folder, chat_template)
    stops = tok.stop_token_ids
    model = tiny_lm(
        seed, vocab_size=448, pad_token_id=stops[0], eos_token_id=stops, max_position_embeddings=context
    )
    model.save_pretrained(folder)
    return model, tok


def attention_widths(monkeypatch) -> list[int]:
    """The number of cache slots each decode attention call attends over, recorded as they happen."""
    import glm4.modeling

    widths: list[int] = []
    attend = glm4.modeling.decode_attention

    def spy(q, k, v, *args):
        widths.append(k.shape[2])
        return attend(q, k, v, *args)

    monkeypatch.setattr(glm4.modeling, "decode_attention", spy)
    return widths


def free_port() -> int:
    """A port free now; whoever binds it next wins, so bind it soon."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_threads(threads: int, fn):
    """fn() on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)
