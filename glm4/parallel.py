"""Tensor parallel on torch.distributed: shard by heads, all-reduce after o_proj and down_proj.

Each rank holds its slice of every attention and MLP projection and reads only that slice from
the safetensors files. q/k/v are split by heads (KV heads replicated when there are fewer of them
than ranks), `o_proj` and `down_proj` by their input columns with an all-reduce of the partial
outputs, and `gate_up_proj` per half: a rank's rows are its slice of the gate rows followed by
its slice of the up rows, so `chunk(2)` in the MLP still splits gate from up. Embeddings, norms
and `lm_head` are replicated: every rank computes the same logits, so every rank samples the
same tokens and runs in lockstep with no further communication.

modeling.py knows nothing of this: the sharded modules keep the checkpoint's names and shapes
are only smaller; the model reads its local head counts from the modules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from glm4.config import Glm4Config
from glm4.linear import Linear
from glm4.quantization import DEFAULT_GROUP_SIZE, Int4Linear, Int8Linear


@dataclass(frozen=True)
class Shard:
    """Which slice of a checkpoint tensor a rank holds: rows or columns [start, stop), or all of it.

    `parts` lists several (start, stop) row ranges concatenated in order (gate_up_proj's halves).
    """

    dim: int | None  # 0: rows, 1: columns, None: replicated
    parts: tuple[tuple[int, int], ...] = ()

    def take(self, tensor_slice, shape: tuple[int, ...]) -> torch.Tensor:
        if self.dim is None:
            return tensor_slice[:]
        pieces = []
        for start, stop in self.parts:
            index = (slice(start, stop),) if self.dim == 0 else (slice(None), slice(start, stop))
            pieces.append(tensor_slice[index])
        return torch.cat(pieces, dim=self.dim)


@dataclass(frozen=True)
class Plan:
    """The shard arithmetic for one rank of `world`, from the config alone."""

    config: Glm4Config
    rank: int
    world: int

    def __post_init__(self) -> None:
        c, w = self.config, self.world
        if c.num_attention_heads % w:
            raise ValueError(f"{c.num_attention_heads} attention heads cannot be split over {w} ranks")
        if c.num_key_value_heads % w and w % c.num_key_value_heads:
            raise ValueError(
                f"{c.num_key_value_heads} KV heads can neither be split over {w} ranks nor replicated "
                "to them (one must divide the other)"
            )
        if c.intermediate_size % w:
            raise ValueError(f"intermediate_size {c.intermediate_size} cannot be split over {w} ranks")

    @property
    def q_heads(self) -> tuple[int, int]:
        n = self.config.num_attention_heads // self.world
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        kv, w = self.config.num_key_value_heads, self.world
        if kv >= w:
            n = kv // w
            return self.rank * n, (self.rank + 1) * n
        # Fewer KV heads than ranks: each rank keeps the one KV head its query heads use.
        head = self.q_heads[0] // (self.config.num_attention_heads // kv)
        return head, head + 1

    def shard(self, name: str) -> Shard:
        d, inter = self.config.head_dim, self.config.intermediate_size
        leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
        module, kind = leaf[0], leaf[1]
        if module == "q_proj":
            a, b = self.q_heads
            return Shard(0, ((a * d, b * d),))
        if module in ("k_proj", "v_proj"):
            a, b = self.kv_heads
            return Shard(0, ((a * d, b * d),))
        if module == "o_proj" and kind == "weight":
            a, b = self.q_heads
            return Shard(1, ((a * d, b * d),))
        n = inter // self.world
        a, b = self.rank * n, (self.rank + 1) * n
        if module == "gate_up_proj":
            return Shard(0, ((a, b), (inter + a, inter + b)))  # my gate rows, then my up rows
        if module == "down_proj" and kind == "weight":
            return Shard(1, ((a, b),))
        return Shard(None)


class RowParallel:
    """For a layer holding some input columns: its partial outputs are summed over the ranks.

    The functional all-reduce is one torch.compile can trace, so a compiled decode step keeps it
    inside its graph.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(super().forward(x), "sum", dist.group.WORLD)


class RowParallelLinear(RowParallel, Linear):
    pass


class RowParallelInt8Linear(RowParallel, Int8Linear):
    pass


class RowParallelInt4Linear(RowParallel, Int4Linear):
    pass


ROW_PARALLEL = {
    Linear: RowParallelLinear,
    Int8Linear: RowParallelInt8Linear,
    Int4Linear: RowParallelInt4Linear,
}


def init_process_group() -> tuple[int, int]:
    """(rank, world size), starting the process group from torchrun's environment if needed."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                "tp_plan='auto' needs several processes: launch with torchrun --nproc-per-node N, "
                "or call torch.distributed.init_process_group first"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def default_device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def shard_model(model: nn.Module, plan: Plan, quantization: dict | None = None) -> dict[str, Shard]:
    """On a meta-device model: shrink the projections to this rank's slice; return each tensor's Shard.

    `quantization` (a quantized checkpoint's method and group size) adds the Shards of its tensors;
    the layers themselves are swapped for quantized ones afterwards (see `keep_row_parallel`).
    """
    shards = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or ".layers." not in f".{name}.":
                continue
            full = f"{name}.{child_name}"
            weight = plan.shard(f"{full}.weight")
            out_f, in_f = child.out_features, child.in_features
            if weight.dim == 0:
                out_f = sum(b - a for a, b in weight.parts)
            elif weight.dim == 1:
                in_f = sum(b - a for a, b in weight.parts)
            cls = RowParallelLinear if child_name in ("o_proj", "down_proj") else Linear
            setattr(module, child_name, cls(in_f, out_f, bias=child.bias is not None, device="meta"))
            shards[f"{full}.weight"] = weight
            if child.bias is not None:
                shards[f"{full}.bias"] = plan.shard(f"{full}.bias")
            if quantization:
                shards.update(quantized_shards(full, weight, quantization))
    return shards


def quantized_shards(full: str, weight: Shard, quantization: dict) -> dict[str, Shard]:
    """The Shards of one layer's tensors in a quantized checkpoint, from the Shard of its weight.

    Split by rows, every tensor of the layer splits by the same rows. Split by input columns, int8
    keeps its per-row scales whole; int4 holds two columns a byte and a (scale, zero) per group of
    columns, so its slices are halved and divided by the group size.
    """
    if weight.dim == 0:
        return {f"{full}.{kind}": weight for kind in ("weight", "scales", "scales_and_zeros")}
    if weight.dim is None or quantization["method"] == "int8":
        return {}
    group = quantization.get("group_size", DEFAULT_GROUP_SIZE)
    check_group_split(full, weight, group)
    return {
        f"{full}.weight": Shard(1, tuple((a // 2, b // 2) for a, b in weight.parts)),
        f"{full}.scales_and_zeros": Shard(1, tuple((a // group, b // group) for a, b in weight.parts)),
    }


def check_group_split(full: str, weight: Shard, group_size: int) -> None:
    if any(a % group_size or b % group_size for a, b in weight.parts):
        (a, b), *_ = weight.parts
        raise ValueError(
            f"{full}: this rank holds input columns {a}..{b}, which do not fall on int4 groups of "
            f"{group_size}; use fewer ranks, a smaller group_size, or int8"
        )


def check_quantized_split(shards: dict[str, Shard], method: str, group_size: int) -> None:
    """Before quantizing a sharded model to int4: every column split falls on a group boundary."""
    if method != "int4":
        return
    for name, shard in shards.items():
        if shard.dim == 1 and name.endswith(".weight"):
            check_group_split(name.removesuffix(".weight"), shard, group_size)


def keep_row_parallel(model: nn.Module) -> None:
    """After quantizing a sharded model (or preparing it for a quantized checkpoint): o_proj and
    down_proj sum their partial outputs over the ranks again, as quantized layers."""
    for module in model.modules():
        for name in ("o_proj", "down_proj"):
            child = getattr(module, name, None)
            if child is not None and not isinstance(child, RowParallel):
                # The row-parallel class adds only the all-reduce to forward: no state to convert.
                child.__class__ = ROW_PARALLEL[type(child)]


# -- lockstep for the CLI and the server: rank 0 decides, the others follow --------------------


def is_tensor_parallel() -> bool:
    """Launched by torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def share(value: object) -> object:
    """Rank 0's value, on every rank (e.g. a line the user typed on rank 0's terminal)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_engine_op(op: str, args: tuple) -> None:
    """Rank 0's engine tells the other ranks which model call comes next (Engine's `mirror`)."""
    share((op, args))


def follow_engine(engine) -> None:
    """The other ranks' serving loop: run every model call rank 0's engine makes, until it stops."""
    while True:
        op, args = share(None)
        if op == "stop":
            return
        getattr(engine, op)(*args)
