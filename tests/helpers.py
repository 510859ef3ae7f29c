"""Tiny models for tests: our model and transformers' on the same random weights."""

from __future__ import annotations

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
    return hf.to(model.dtype).eval()


def tiny_lm(seed: int = 0, **overrides) -> Glm4ForCausalLM:
    torch.manual_seed(seed)
    return perturb(Glm4ForCausalLM(tiny_config(**overrides)), seed).eval()


def random_ids(batch: int, length: int, vocab: int = 128, seed: int = 0, low: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, length), generator=g)
