"""Glm4Config: the checkpoint's config.json as a dataclass, with the transformers field names.

Two spellings of config.json occur in the wild (reference §1): transformers 4.x writes rope settings
top-level (`rope_theta`, `partial_rotary_factor`, `rope_scaling`) and `torch_dtype`; transformers 5.x
writes them inside `rope_parameters` and calls the dtype `dtype`. We read both and write the 5.x form.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
DEFAULT_EOS_TOKEN_IDS = [151329, 151336, 151338]  # <|endoftext|>, <|user|>, <|observation|>
_DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}


@dataclass
class Glm4Config:
    # Defaults are transformers' Glm4Config defaults, so a config.json that omits a field means the
    # same thing here as there. Real checkpoints set rms_norm_eps=1e-5 explicitly.
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1.5625e-07
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_ROPE))
    pad_token_id: int | None = 151329
    eos_token_id: int | list[int] | None = field(default_factory=lambda: list(DEFAULT_EOS_TOKEN_IDS))
    bos_token_id: int | None = None
    attention_bias: bool = True
    dtype: str | None = None
    architectures: list[str] | None = None
    # Classification heads (the PreTrainedConfig fields transformers uses for them).
    num_labels: int | None = None
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    classifier_dropout: float | None = None
    # Weight-only quantization of a checkpoint saved by glm4: {"method": "int8"|"int4", "group_size": n}.
    quantization: dict[str, Any] | None = None
    # Keys we do not model, kept so that save_pretrained writes them back.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rope_parameters = dict(self.rope_parameters or {})
        rope = self.rope_parameters
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", 10000.0)
        rope.setdefault("partial_rotary_factor", 0.5)
        if rope["rope_type"] == "yarn":
            rope.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        if self.eos_token_id is None:
            self.eos_token_id = list(DEFAULT_EOS_TOKEN_IDS)
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels or 2)}
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.num_labels = len(self.id2label)
        self.validate()

    # -- derived sizes ----------------------------------------------------------------------

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def partial_rotary_factor(self) -> float:
        return float(self.rope_parameters["partial_rotary_factor"])

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def max_context(self) -> int | None:
        """Longest sequence the rope allows, or None when its scaling extrapolates without a bound."""
        rope = self.rope_parameters
        if self.rope_type == "dynamic":
            return None
        if self.rope_type == "linear":
            return int(self.max_position_embeddings * rope["factor"])
        if self.rope_type == "yarn":
            scaled = int(rope["original_max_position_embeddings"] * rope["factor"])
            return max(self.max_position_embeddings, scaled)
        return self.max_position_embeddings

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"rotary dim = head_dim * partial_rotary_factor = {self.head_dim} * "
                f"{self.partial_rotary_factor} = {self.rotary_dim}; it must be even and in (0, head_dim]"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.rope_type in ("linear", "dynamic", "yarn") and not self.rope_parameters.get("factor"):
            raise ValueError(f"rope type {self.rope_type!r} needs a 'factor' in rope_parameters")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; GLM-4 uses 'silu'")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # -- config.json --------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Glm4Config:
        data = dict(data)
        model_type = data.pop("model_type", "glm4")
        if model_type != "glm4":
            raise ValueError(
                f"config.json has model_type {model_type!r}; this package runs GLM-4-0414 checkpoints "
                "(model_type 'glm4'). GLM-4-9B-chat (chatglm) and GLM-4.5 (glm4_moe) are other architectures."
            )
        data.pop("transformers_version", None)
        torch_dtype = data.pop("torch_dtype", None)
        if data.get("dtype") is None:
            data["dtype"] = torch_dtype
        # Rope: `rope_parameters` wins, then `rope_scaling`, then the top-level fields fill the gaps.
        rope = dict(data.pop("rope_parameters", None) or data.pop("rope_scaling", None) or {})
        data.pop("rope_scaling", None)
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in data:
                rope.setdefault(key, data.pop(key))
        data["rope_parameters"] = rope
        quant = data.pop("quantization_config", None)
        if quant is not None:
            if quant.get("quant_method") != "glm4":
                raise ValueError(
                    f"this checkpoint is quantized with {quant.get('quant_method')!r}, which glm4 "
                    "cannot load; "
                    "use the bfloat16 checkpoint (glm4 can quantize it: quantization='int8' or 'int4')"
                )
            data["quantization"] = {k: v for k, v in quant.items() if k != "quant_method"}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_type": "glm4"}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "num_labels", "id2label", "label2id"):
                continue
            out[f.name] = getattr(self, f.name)
        if self.id2label != {0: "LABEL_0", 1: "LABEL_1"}:
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = dict(self.label2id)
        for key in ("problem_type", "classifier_dropout", "architectures", "dtype"):
            if out[key] is None:
                del out[key]
        quantization = out.pop("quantization")
        if quantization:
            out["quantization_config"] = {"quant_method": "glm4", **quantization}
        out.update(self.extra)
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Glm4Config:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Glm4Config:
        """Read config.json from a local folder (or a config.json path) or a hub repo id."""
        from glm4.checkpoint import resolve_checkpoint

        if Path(path_or_repo_id).is_file():
            return cls.from_json_file(path_or_repo_id)
        folder = resolve_checkpoint(path_or_repo_id, revision=revision, allow_patterns=["config.json"])
        return cls.from_json_file(folder / "config.json")

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False)
        (folder / "config.json").write_text(text + "\n", encoding="utf-8")
