"""Find a checkpoint (local folder or hub id), read and write (sharded) safetensors.

Weights come from safetensors only: a pickle file can run code when loaded, so `.bin` checkpoints
are refused with a pointer to converting them. Loading builds the model on the meta device and
assigns the tensors read from the files, so no weight is initialised only to be overwritten and
peak memory stays near the size of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from glm4 import hugepages
from glm4.config import Glm4Config

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("glm4")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- finding the files ---------------------------------------------------------------------------


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder as it is, or a hub repo id downloaded into (or found in) the hub cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists():
        raise ValueError(f"{text} is a file; pass the checkpoint folder that contains config.json")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", text) or text.startswith((".", "/", "~")):
        raise ValueError(
            f"checkpoint folder {text} does not exist (and it is not a hub repo id like org/name)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = snapshot_download(
            text,
            revision=revision,
            cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE"),
            allow_patterns=allow_patterns or HUB_PATTERNS,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        raise ValueError(
            f"{text} is not in the local hub cache and downloading is off (HF_HUB_OFFLINE) or the hub "
            "cannot be reached; download it once online, or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise ValueError(f"could not fetch {text} from the hub: {e}") from None
    return Path(folder)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checking that every shard the index names exists."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{INDEX_FILE} names shard {f.name}, which is missing from {folder}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ValueError(
            f"{folder} has only pickle weights ({', '.join(sorted(pickles))}); glm4 loads safetensors only, "
            "because unpickling can run arbitrary code. Convert the checkpoint to safetensors first."
        )
    raise ValueError(f"{folder} has no model weights ({SINGLE_FILE} or {INDEX_FILE})")


@contextmanager
def open_safetensors(path: Path, device: torch.device | str = "cpu") -> Iterator[Any]:
    """safe_open, with a corrupt or truncated file reported by name."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as reader:
            yield reader
    except SafetensorError as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def read_tensors(
    files: list[Path],
    device: torch.device | str,
    shards: dict[str, Any] | None = None,
    is_base: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from each file in turn, one tensor in memory at a time beyond the model;
    for a tensor in `shards`, only the slice this rank holds.

    On the CPU a whole tensor is read from the file into memory of its own (on huge pages, see
    hugepages.py) rather than handed out as a view of the memory-mapped file: decoding reads
    anonymous memory about 8% faster, and the mapped pages would count against the peak resident
    memory while loading.
    """
    on_cpu = torch.device(device).type == "cpu"
    for f in tqdm(files, desc="Loading shards", unit="shard", disable=len(files) < 2):
        with open_safetensors(f, device) as reader, open(f, "rb", buffering=0) as raw:
            layout = data_layout(raw) if on_cpu else {}
            for name in reader.keys():  # noqa: SIM118 (safe_open is not iterable)
                shard = shards.get(_our_name(name, is_base)) if shards else None
                if shard is not None:
                    yield name, hugepages.adopt(shard.take(reader.get_slice(name), ()))
                elif name in layout:
                    yield name, read_tensor(raw, *layout[name])
                else:
                    yield name, reader.get_tensor(name)


_FILE_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def data_layout(raw: Any) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """name -> (dtype, shape, first byte, end byte) from a safetensors header (8-byte length, then
    JSON), for the dtypes read here; safe_open has already checked the header and the offsets."""
    raw.seek(0)
    size = int.from_bytes(raw.read(8), "little")
    header = json.loads(raw.read(size))
    start = 8 + size
    return {
        name: (
            _FILE_DTYPES[info["dtype"]],
            info["shape"],
            start + info["data_offsets"][0],
            start + info["data_offsets"][1],
        )  # fmt: skip
        for name, info in header.items()
        if name != "__metadata__" and info["dtype"] in _FILE_DTYPES
    }


def read_tensor(raw: Any, dtype: torch.dtype, shape: list[int], begin: int, end: int) -> torch.Tensor:
    out = hugepages.empty(shape, dtype)
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
    if len(buffer) != end - begin:
        raise ValueError(f"{raw.name}: a tensor's byte range does not match its shape (corrupt file?)")
    raw.seek(begin)
    done = 0
    while done < len(buffer):
        got = raw.readinto(buffer[done:])
        if not got:
            raise ValueError(f"{raw.name} ends early (truncated?)")
        done += got
    return out


# -- loading -------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype, config: Glm4Config, files: list[Path]) -> torch.dtype:
    if dtype == "auto":
        name = config.dtype
        if name is None:  # no dtype in config.json: use what the first tensor is stored in
            with open_safetensors(files[0]) as reader:
                first = next(iter(reader.keys()), None)
                name = str(reader.get_slice(first).get_dtype()) if first else "F32"
            name = {"BF16": "bfloat16", "F16": "float16"}.get(name, "float32")
        dtype = _DTYPES.get(name, torch.float32)
        if dtype == torch.float16:
            logger.warning("checkpoint is float16; loading as bfloat16 (GLM-4 overflows float16)")
            dtype = torch.bfloat16
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype == torch.float16:
        raise ValueError(
            "float16 is not supported: GLM-4 activations exceed float16's range (65504). "
            "Use dtype=torch.bfloat16 (or torch.float32)."
        )
    return dtype


def load_weights(
    model: nn.Module,
    files: list[Path],
    device: torch.device | str,
    dtype: torch.dtype,
    shards: dict[str, Any] | None = None,
) -> None:
    """Assign the checkpoint's tensors to a model built on the meta device, strictly.

    `shards` (tensor parallel) maps a tensor to the slice of it this rank holds: only that slice
    is read from the file.
    """
    expected = model.state_dict()
    is_base = not any(k.startswith("model.") for k in expected)
    has_lm_head = "lm_head.weight" in expected
    loaded: set[str] = set()
    unexpected: list[str] = []
    ignored: list[str] = []
    for name, tensor in read_tensors(files, device, shards, is_base):
        key = _our_name(name, is_base)
        if key not in expected:
            # A causal-LM checkpoint loaded into a base model or a classification head, or the reverse.
            if key.startswith(("lm_head.", "score.")) or key.endswith("rotary_emb.inv_freq"):
                ignored.append(name)
            else:
                unexpected.append(name)
            continue
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but the config gives "
                f"{tuple(expected[key].shape)}; does config.json belong to these weights?"
            )
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = hugepages.adopt(tensor.to(dtype))
        model.load_state_dict({key: tensor}, strict=False, assign=True)
        loaded.add(key)
    if unexpected:
        raise ValueError(f"checkpoint has tensors this model does not: {', '.join(sorted(unexpected))}")
    tied = getattr(model.config, "tie_word_embeddings", False) and has_lm_head
    missing = [k for k in expected if k not in loaded and not (tied and k == "lm_head.weight")]
    fresh = [k for k in missing if k.startswith("score.")]
    missing = [k for k in missing if k not in fresh]
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {', '.join(sorted(missing))}")
    if fresh:
        _init_fresh(model, fresh, device, dtype)
        logger.warning(
            "%s is newly initialised (not in the checkpoint): train it before use", ", ".join(fresh)
        )
    if ignored:
        logger.info("ignored checkpoint tensors this model has no use for: %s", ", ".join(ignored))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _our_name(name: str, is_base: bool) -> str:
    """Map a tensor name to our module path: base models drop the `model.` prefix heads have."""
    if is_base:
        return name.removeprefix("model.")
    if name.startswith(("model.", "lm_head.", "score.")):
        return name
    return "model." + name  # a checkpoint saved from a bare Glm4Model


def _init_fresh(model: nn.Module, keys: list[str], device: torch.device | str, dtype: torch.dtype) -> None:
    std = model.config.initializer_range
    shapes = model.state_dict()
    fresh = {}
    for key in keys:
        t = torch.empty(shapes[key].shape, device=device, dtype=dtype)
        fresh[key] = t.zero_() if key.endswith(".bias") else t.normal_(std=std)
    model.load_state_dict(fresh, strict=False, assign=True)


# -- saving --------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB' or an int of bytes")
    number, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def save_weights(
    state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write safetensors shards (and an index when there is more than one), as transformers does."""
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata={"format": "pt"})
        return [folder / SINGLE_FILE]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, path.name))
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for the model classes; knows files, not layers."""

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        config: Glm4Config | None = None,
        quantization: str | None = None,
        group_size: int = 64,
        tp_plan: str | None = None,
    ) -> Any:
        """Load a checkpoint; `quantization` ("int8" or "int4") quantizes its weights on the way in;
        `tp_plan="auto"` shards it over the ranks of the process group (tensor parallel)."""
        from glm4.quantization import pack_quantized, prepare_quantized_model, quantize

        folder = resolve_checkpoint(path_or_repo_id, revision=revision, cache_dir=cache_dir)
        if config is None:
            if not (folder / "config.json").is_file():
                raise ValueError(f"{folder} has no config.json: is it a GLM-4 checkpoint folder?")
            config = Glm4Config.from_json_file(folder / "config.json")
        files = weight_files(folder)
        dtype = resolve_dtype(dtype, config, files)
        saved = config.quantization
        if saved and quantization and quantization != saved["method"]:
            raise ValueError(f"this checkpoint is already quantized as {saved['method']}, not {quantization}")
        shards, world = None, 1
        if tp_plan is not None:
            from glm4.parallel import (
                Plan,
                check_quantized_split,
                default_device,
                init_process_group,
                keep_row_parallel,
                shard_model,
            )

            if tp_plan != "auto":
                raise ValueError(f"tp_plan must be 'auto' or None, got {tp_plan!r}")
            rank, world = init_process_group()
            device = device if device != "cpu" else default_device()
        with torch.device("meta"):
            model = cls(config)
            if tp_plan is not None:
                # Shard first, so that quantized layers are built with this rank's shapes.
                shards = shard_model(model, Plan(config, rank, world), saved)
                if quantization and not saved:
                    check_quantized_split(shards, quantization, group_size)
            if saved:
                prepare_quantized_model(model, saved)
        load_weights(model, files, device, dtype, shards)
        model.tp_world = world
        model.init_buffers(device)
        if saved:
            pack_quantized(model)
        elif quantization:
            quantize(model, quantization, group_size)
        if tp_plan is not None and (saved or quantization):
            keep_row_parallel(model)
        model.name_or_path = str(path_or_repo_id)
        generation_config = folder / "generation_config.json"
        if generation_config.is_file():
            model.generation_config = json.loads(generation_config.read_text())
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = self.config
        config.architectures = [type(self).__name__]
        config.dtype = str(self.dtype).removeprefix("torch.")
        config.save_pretrained(folder)
        generation_config = getattr(self, "generation_config", None)
        if generation_config:
            (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        save_weights(state, folder, max_shard_size)
