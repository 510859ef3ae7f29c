"""Decode and prefill speed of glm4 against transformers, on the same random weights, in one run.

Builds a GLM-4-shaped random model (hidden 1024, 12 layers, 16 heads, 2 KV heads, head_dim 64,
intermediate 2816, vocab 151552; or the GLM-4-9B shape with --gpu) in bf16, saves it once, and
loads it into both (with --gpu, or --in-memory: hands the same tensors to both instead, as 18 GB
through a disk would take minutes of a short GPU lease). Decode speed is also given as a fraction of
the memory-bandwidth roofline: (bytes of weights read per token / seconds per token) / the streaming
read bandwidth, read between stretches of 16 tokens (see Stretches: the bandwidth here drifts with
the neighbours' load). Every figure alternates between the variants for a few rounds and shows the
median, so that glm4 and transformers meet the same machine. The int8 and int4 models also prefill
512 tokens and decode at the batch sizes, against transformers bf16; --long adds the prefill of a long
prompt and the decoding after it.

    python bench/decode.py            # CPU, the small GLM-4 shape
    python bench/decode.py --gpu      # CUDA, the GLM-4-9B shape
    python bench/decode.py --gpu --variants bf16,eager --batches 8 --long 0    # a shorter run
    python bench/decode.py --gpu --variants bf16,bf16+sdpa,bf16+overlap --batches "" --long 0

A variant is a path (bf16: the default; compiled; eager; int8; int4) with optional candidates for
the CUDA step after "+": sdpa or reduce (`set_decode_attention`), qkv (`fuse_qkv`), each on a model
object sharing the weights; overlap (`stream_tokens(..., overlap=True)`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from glm4 import Glm4Config, Glm4ForCausalLM, hugepages
from glm4.attention import DECODE_ATTENTION
from glm4.generation import stream_tokens
from glm4.quantization import quantize

VARIANTS = ("bf16", "compiled", "eager", "int8", "int4")
CANDIDATES = (*(how for how in DECODE_ATTENTION if how != "einsum"), "qkv", "overlap")

SMALL = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=2,
             head_dim=64, intermediate_size=2816)  # fmt: skip
GLM4_9B = dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
               head_dim=128, intermediate_size=13696)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Meter:
    """Streaming read bandwidth in bytes/s: the best of a few reads of a buffer far above cache, by
    torch's sum() and (on the CPU, where it builds) by a sum that asks for its lines ahead, as
    glm4's kernels do (bench/stream_read.cpp): on some CPUs a core's hardware prefetcher alone
    reads well below what memory allows."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.prefetching = None
        if device.startswith("cuda"):
            self.buf = torch.ones((4 << 30) // 4, device=device)
        else:  # on huge pages, as the weights: the best this machine reads
            self.buf = hugepages.empty(((1 << 30) // 4,), torch.float32).fill_(1)
            self.prefetching = prefetching_read()

    def read(self, repeats: int = 10) -> float:
        readers = [self.buf.sum]
        if self.prefetching is not None:
            pointer, n = self.buf.data_ptr(), self.buf.numel()
            readers.append(lambda: self.prefetching(pointer, n, torch.get_num_threads()))
        best = float("inf")
        for _ in range(repeats):
            for reader in readers:
                sync(self.device)
                t = time.perf_counter()
                reader()
                sync(self.device)
                best = min(best, time.perf_counter() - t)
        return self.buf.numel() * 4 / best


def prefetching_read():
    """bench/stream_read.cpp's reader, built as glm4's kernels are; None where it cannot be."""
    from glm4 import kernels

    if not kernels.available("bf16_linear"):  # x86-64 with AVX-512 or AVX2, and a compiler
        return None
    try:
        path = kernels.build([Path(__file__).with_name("stream_read.cpp")], kernels.cache_dir(), "glm4_bench")
    except (OSError, subprocess.SubprocessError) as e:
        print(f"(the prefetching bandwidth reader did not build: {e}; torch's sum alone reads it)")
        return None
    read = ctypes.CDLL(str(path)).glm4_bench_read
    read.restype = ctypes.c_double
    read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return read


class Stretches:
    """Decode timing with the bandwidth read between stretches of `every` tokens.

    This machine's read bandwidth drifts with its neighbours' load (30 to 58 GB/s from one minute
    to the next), so each stretch's speed is set against readings taken right before and after it
    (the higher one: the stricter). Call start() once the first token is out, tick() after each
    later one; the pauses for reading are left out of the timings.
    """

    def __init__(self, meter: Meter, batch: int = 1, every: int = 16) -> None:
        self.meter, self.batch, self.every = meter, batch, every
        self.runs: list[tuple[float, float, float]] = []  # (tokens, seconds, bandwidth)

    def start(self) -> None:
        self.bw_before = self.meter.read(3)
        self.count, self.t0 = 0, time.perf_counter()

    def tick(self) -> None:
        sync(self.meter.device)
        self.count += 1
        if self.count == self.every:
            seconds = time.perf_counter() - self.t0
            bw_after = self.meter.read(3)
            self.runs.append((self.batch * self.every, seconds, max(self.bw_before, bw_after)))
            self.bw_before, self.count, self.t0 = bw_after, 0, time.perf_counter()

    @property
    def rate(self) -> float:
        return sum(r[0] for r in self.runs) / sum(r[1] for r in self.runs)


def roofline(timings: list[Stretches], bytes_per_token: int) -> tuple[float, float]:
    """(median fraction of the roofline over all the stretches, median bandwidth read)."""
    runs = [r for t in timings for r in t.runs]
    fractions = [tokens / seconds * bytes_per_token / bw for tokens, seconds, bw in runs]
    return statistics.median(fractions), statistics.median(r[2] for r in runs)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from weights: everything but the embedding table (one row of it)."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, t in own:
            # The int4 CPU kernel reads its own packing of the weight, not the saved layout.
            if name == "inv_freq" or (
                getattr(module, "packed", None) is not None and name in ("weight", "scales_and_zeros")
            ):
                continue
            total += t.numel() * t.element_size()
    return total


def peak_rss_mib() -> float:
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def glm4_decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(time to first token, decode tokens/s summed over the batch) on glm4's default path."""
    stamps = []
    sync(device)
    start = time.perf_counter()
    for _ in stream_tokens(model, prompt, max_new_tokens=new_tokens, eos_token_id=[]):
        sync(device)
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    return ttft, prompt.shape[0] * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def glm4_stretches(
    model, prompt: torch.Tensor, new_tokens: int, meter: Meter, compile=None, overlap=False
) -> Stretches:
    timing = Stretches(meter, prompt.shape[0])
    steps = stream_tokens(
        model, prompt, max_new_tokens=new_tokens, eos_token_id=[], compile=compile, overlap=overlap
    )
    for i, _ in enumerate(steps):
        if i == 0:
            timing.start()
        else:
            timing.tick()
    return timing


def hf_stretches(model, prompt: torch.Tensor, new_tokens: int, meter: Meter) -> Stretches:
    """The same for transformers' generate, through its streamer hook (first put: the prompt)."""
    timing = Stretches(meter, prompt.shape[0])

    class Streamer:
        puts = 0

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                timing.start()
            elif self.puts > 2:
                timing.tick()

        def end(self):
            pass

    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, streamer=Streamer())
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return timing


def hf_decode(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, float]:
    """(time to first token, decode tokens/s) for transformers' generate, from t(N tokens) - t(1 token)."""
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        return timed(lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs), device)

    one = min(run(1) for _ in range(2))
    full = run(new_tokens)
    return one, prompt.shape[0] * (new_tokens - 1) / (full - one)


def prefill_rate(model, length: int, device: str, vocab: int, repeats: int = 3) -> float:
    """Prompt tokens a second: the best of `repeats` timed forwards after one to warm up."""
    ids = torch.randint(0, vocab, (1, length), device=device)
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
        best = min(timed(lambda: model(ids, logits_to_keep=1), device) for _ in range(repeats))
    return length / best


def models_from_disk(config, device: str, quantized: list[str], with_hf: bool, tmp: str):
    """{name: glm4 model} and the transformers model (or None), each loaded from one saved checkpoint."""
    with torch.device(device):
        Glm4ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
    models = {"glm4 bf16": Glm4ForCausalLM.from_pretrained(tmp, device=device)}
    for quant in quantized:
        models[f"glm4 {quant}"] = Glm4ForCausalLM.from_pretrained(tmp, device=device, quantization=quant)
    hf = None
    if with_hf:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to(device)
        hf.eval()
    return models, hf


def models_in_memory(config, device: str, quantized: list[str], with_hf: bool, tmp: str):
    """The same, built on the device: the quantized models from copies of the bf16 one, and
    transformers' model (from the saved config.json alone) given the same weights."""
    with torch.device(device):
        ours = Glm4ForCausalLM(config).to(torch.bfloat16).eval()
    models = {"glm4 bf16": ours}
    for quant in quantized:
        models[f"glm4 {quant}"] = quantize(copy.deepcopy(ours), quant)
    hf = None
    if with_hf:
        import transformers

        config.save_pretrained(tmp)
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(tmp), dtype=torch.bfloat16
            )
        missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
        names = {name for name, _ in hf.named_parameters()}
        if names & set(missing) or unexpected:
            raise RuntimeError(f"weights transformers lacks {unexpected} or was not given {missing}")
        hf.eval()
    return models, hf


def greedy_tokens(model, prompt: torch.Tensor, new_tokens: int, compile, overlap=False) -> list[int]:
    steps = stream_tokens(
        model, prompt, max_new_tokens=new_tokens, eos_token_id=[], compile=compile, overlap=overlap
    )
    return [int(t[0]) for t in steps]


def stepwise_logits(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The module's logits for ids[:, start:], one token at a time on a cache (decode attention,
    eager): (steps, vocab) in float32."""
    with torch.inference_mode():
        out = model(ids[:, :start], use_cache=True)
        cache, logits = out.past_key_values, []
        for t in range(start, ids.shape[1]):
            logits.append(model(ids[:, t : t + 1], past_key_values=cache).logits[0, -1].float())
    return torch.stack(logits)


def logits_agreement(logits: torch.Tensor, reference: torch.Tensor) -> str:
    err = ((logits - reference).abs().max() / reference.abs().max()).item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return f"max |diff| {err:.1%} of max |logit|, top-1 agrees {top1:.0%}"


def agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"the first {same} of {len(a)} agree"


def parse_variant(variant: str) -> tuple[str, list[str]]:
    """A variant's path and candidates ("bf16+sdpa+overlap": bf16, [sdpa, overlap]), or ValueError."""
    path, *candidates = variant.split("+")
    if path not in VARIANTS or not set(candidates) <= set(CANDIDATES):
        raise ValueError(variant)
    if len([c for c in candidates if c in DECODE_ATTENTION]) > 1:
        raise ValueError(variant)
    if "qkv" in candidates and path in ("int8", "int4"):  # quantized projections are not fused
        raise ValueError(variant)
    return path, candidates


def sharing_weights(model: Glm4ForCausalLM) -> Glm4ForCausalLM:
    """Another model object on the same weight tensors (fused q/k/v matrices included), for settings
    a compiled step specialises on."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() for t in (getattr(m, "qkv", None) or ()) if t is not None]
    return copy.deepcopy(model, memo={id(t): t for t in tensors})


class Variant(NamedTuple):
    model: Glm4ForCausalLM
    compile: bool | None
    overlap: bool
    arithmetic: bool  # candidates that change the step's arithmetic, on a bf16 model
    base: str  # the model it is a variant of ("glm4 bf16", "glm4 int8", "glm4 int4")


def variant_rows(chosen: list[str], models: dict) -> dict[str, Variant]:
    """{row name: Variant} for glm4's batch-1 rows. Variants of the same settings share one model
    object: a compiled step is shared by models of the same settings, and CUDA graphs recorded for
    one model's cache would be recorded again for another's every time the two alternate."""
    rows, settled = {}, {}
    for variant in chosen:
        path, candidates = parse_variant(variant)
        base = f"glm4 {path}" if path in ("int8", "int4") else "glm4 bf16"
        how = next((c for c in candidates if c in DECODE_ATTENTION), None)
        key = (base, how, "qkv" in candidates)
        if key not in settled:  # a model object on the base's weights with these settings
            model = models[base]
            if "qkv" in candidates:  # one fused matrix for every such variant: the parameters view it
                if (base, None, True) not in settled:
                    settled[base, None, True] = sharing_weights(model)
                    settled[base, None, True].fuse_qkv()
                model = settled[base, None, True]
            if how is not None:
                model = sharing_weights(model)
                model.set_decode_attention(how)
            settled[key] = model
        name = {"compiled": "bf16 compiled", "eager": "bf16 eager"}.get(path, path)
        compile = {"compiled": True, "eager": False}.get(path)
        arithmetic = path not in ("int8", "int4") and bool({"sdpa", "reduce", "qkv"} & set(candidates))
        label = f"glm4 {name}{''.join('+' + c for c in candidates)}"
        rows[label] = Variant(settled[key], compile, "overlap" in candidates, arithmetic, base)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="CUDA and the GLM-4-9B shape")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batches", default="2,4,8,32", help="batch sizes for the throughput rows")
    parser.add_argument(
        "--long", type=int, default=4000, help="long-prompt rows: prefill it, decode after it (0: none)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per measurement")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-quantized", action="store_true")
    parser.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds this run may take (0: no limit): variants whose warm-up (compile) would start past "
        "half of it are left out, so that a short GPU lease still gets the others' figures",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"glm4's batch-1 rows: {'|'.join(VARIANTS)}, each with optional +{'/+'.join(CANDIDATES)}",
    )
    parser.add_argument(
        "--in-memory", action="store_true", help="no checkpoint on disk: both models get the same tensors"
    )
    args = parser.parse_args()
    chosen = [v for v in args.variants.split(",") if v]
    for variant in chosen:
        try:
            parse_variant(variant)
        except ValueError:
            parser.error(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}, each with optional "
                         f"+{', +'.join(CANDIDATES)} (one way of attending at most; +qkv not on "
                         "int8/int4)")  # fmt: skip
    if args.skip_quantized:
        chosen = [v for v in chosen if parse_variant(v)[0] not in ("int8", "int4")]
    args.in_memory = args.in_memory or args.gpu
    device = "cuda" if args.gpu else "cpu"
    shape = GLM4_9B if args.gpu else SMALL
    config = Glm4Config(**shape, vocab_size=151552, max_position_embeddings=32768, rms_norm_eps=1e-5,
                        pad_token_id=0, eos_token_id=[1])  # fmt: skip
    started = time.monotonic()
    meter = Meter(device)
    print(f"device: {device} ({torch.cuda.get_device_name() if args.gpu else 'CPU'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print(f"streaming read bandwidth at the start: {meter.read() / 1e9:.1f} GB/s")
    print(f"every measurement alternates between the variants, {args.rounds} rounds; medians shown")
    batches = [int(x) for x in args.batches.split(",") if x]

    def row(name: str, value: str) -> None:
        print(f"  {name:<44} {value}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        prompt = torch.randint(0, 151552, (1, args.prompt), device=device)
        quantized = [q for q in ("int8", "int4") if q in {parse_variant(v)[0] for v in chosen}]
        if args.in_memory:
            models, hf = models_in_memory(config, device, quantized, not args.skip_transformers, tmp)
        else:
            models, hf = models_from_disk(config, device, quantized, not args.skip_transformers, tmp)

        probe = torch.randint(0, 151552, (1, 64), device=device)
        with torch.inference_mode():
            reference = models["glm4 bf16"](probe).logits.float()
            others = {name: model(probe).logits.float() for name, model in list(models.items())[1:]}
            if hf is not None:
                others["transformers bf16"] = hf(probe).logits.float()
            for name, logits in others.items():
                row(f"{name}: logits vs glm4 bf16 (64 positions)", logits_agreement(logits, reference))

        # Batch 1: decode rate and roofline fraction, every variant in turn, round after round: the
        # default paths (bf16: the fused CPU step, or the compiled graph on CUDA; int8/int4: the
        # fused CPU step, or the compiled graph), bf16's other two (the compiled graph and the
        # module as it is, compile=False), and any of them with candidates for the CUDA step.
        variants = variant_rows(chosen, models)
        for name, (model, compile, overlap, *_) in list(variants.items()):  # warm up (and compile) each path
            if args.budget and time.monotonic() - started > args.budget / 2 and name != "glm4 bf16":
                row(f"{name}: left out", f"no time to compile it within --budget {args.budget:.0f}")
                del variants[name]
                continue
            try:
                glm4_stretches(model, prompt, args.new_tokens, meter, compile, overlap)
            except Exception as e:  # a candidate that fails here should not cost the run the others
                row(f"{name}: failed, left out", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                del variants[name]
        defaults: dict[str, list[int]] = {}  # each base model's greedy tokens on its default path

        def default(base: str) -> list[int]:
            if base not in defaults:
                defaults[base] = greedy_tokens(models[base], prompt, 32, None)
            return defaults[base]

        for name, (model, compile, overlap, arithmetic, base) in variants.items():
            if arithmetic:  # the eager decode step's logits, teacher-forced, against the base's
                forced = torch.cat([prompt, torch.tensor([default(base)], device=device)], dim=1)
                reference = stepwise_logits(models[base], forced, prompt.shape[1])
                ours = stepwise_logits(model, forced, prompt.shape[1])
                row(f"{name}: logits token by token vs {base} (32)", logits_agreement(ours, reference))
            if name == "glm4 bf16 eager":  # the default path's greedy tokens against the module's
                eager = greedy_tokens(model, prompt, 32, False)
                row(f"{base}: greedy tokens, default vs eager", agreement(default(base), eager))
            elif "+" in name:
                tokens = greedy_tokens(model, prompt, 32, compile, overlap)
                row(f"{name}: greedy tokens vs {base}", agreement(tokens, default(base)))
        names = [*variants, *(["transformers bf16"] if hf is not None else [])]
        timings: dict[str, list[Stretches]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, (model, compile, overlap, *_) in variants.items():
                timings[name].append(glm4_stretches(model, prompt, args.new_tokens, meter, compile, overlap))
            if hf is not None:
                with torch.inference_mode():
                    timings["transformers bf16"].append(hf_stretches(hf, prompt, args.new_tokens, meter))
        rate = {}
        for name, runs in timings.items():
            per_token = weight_bytes_per_token(
                hf if name.startswith("transformers") else variants[name].model
            )
            rate[name] = statistics.median(t.rate for t in runs)
            roof, bw = roofline(runs, per_token)
            row(f"{name}: decode batch 1", f"{rate[name]:7.1f} tok/s  ({roof:.0%} of roofline at "
                f"{bw / 1e9:.1f} GB/s, {per_token / 2**20:.0f} MiB/token)")  # fmt: skip

        # Prefill, time to first token and batched decoding: bf16 against transformers, in turn.
        ours = models["glm4 bf16"]
        long_prompt = torch.randint(0, 151552, (1, 512), device=device)
        # The first call of a shape pays one-time costs (a new cache, library kernel selection):
        # warmed up once, then the median of the rounds.
        glm4_decode(ours, long_prompt, 2, device)
        ttft = statistics.median(glm4_decode(ours, long_prompt, 2, device)[0] for _ in range(args.rounds))
        row("glm4 bf16: time to first token (512 prompt)", f"{ttft * 1000:7.0f} ms")
        pairs = {"prefill 512": (lambda m: prefill_rate(m, 512, device, 151552),) * 2}
        if args.long:  # decoding after a long prompt (Z1 answers run long): attention grows with it
            long = torch.randint(0, 151552, (1, args.long), device=device)
            glm4_decode(ours, long, 64, device)  # warm up this cache size
            pairs[f"prefill {args.long}"] = (lambda m: prefill_rate(m, args.long, device, 151552, 1),) * 2
            pairs[f"decode batch 1 after {args.long} tokens"] = (
                lambda m: glm4_decode(m, long, 64, device)[1],
                lambda m: hf_decode(m, long, 64, device)[1],
            )

        def fresh(model, batch: torch.Tensor) -> float:
            """Decode rate as a fresh process would decode this batch: without the packed copy
            another batch's run made (with it, up to 8 rows take the compiled graph)."""
            model.unpack_weights()
            return glm4_decode(model, batch, 64, device)[1]

        for b in batches:
            batch = prompt.expand(b, -1).contiguous()
            fresh(ours, batch)  # warm up (and compile) this shape
            pairs[f"decode batch {b}"] = (
                lambda m, batch=batch: fresh(m, batch),
                lambda m, batch=batch: hf_decode(m, batch, 64, device)[1],
            )
        ratios = (
            {f"{name} decode batch 1": rate[name] / rate["transformers bf16"] for name in variants}
            if hf is not None
            else {}
        )
        theirs_median = {}  # transformers' figure per row
        for what, (mine, theirs) in pairs.items():
            runs = {"glm4": [], "hf": []}
            for _ in range(args.rounds):
                runs["glm4"].append(mine(ours))
                if hf is not None:
                    with torch.inference_mode():
                        runs["hf"].append(theirs(hf))
            row(f"glm4 bf16: {what}", f"{statistics.median(runs['glm4']):7.1f} tok/s")
            if hf is not None:
                row(f"transformers bf16: {what}", f"{statistics.median(runs['hf']):7.1f} tok/s")
                theirs_median[what] = statistics.median(runs["hf"])
                ratios[f"glm4 bf16 {what}"] = statistics.median(runs["glm4"]) / theirs_median[what]
        # Prefill and batches with quantized weights (other kernels than at batch 1).
        for name in (n for n in models if n != "glm4 bf16"):
            measures = {"prefill 512": lambda m: prefill_rate(m, 512, device, 151552)}
            for b in batches:
                batch = prompt.expand(b, -1).contiguous()
                fresh(models[name], batch)  # warm up (and compile) this shape
                measures[f"decode batch {b}"] = lambda m, batch=batch: fresh(m, batch)
            for what, measure in measures.items():
                median = statistics.median(measure(models[name]) for _ in range(args.rounds))
                row(f"{name}: {what}", f"{median:7.1f} tok/s")
                if what in theirs_median:
                    ratios[f"{name} {what}"] = median / theirs_median[what]
        if ratios:
            print("\nratios against transformers bf16 (same weights, same run, measured in turn):")
            for what, ratio in ratios.items():
                print(f"  {what}: {ratio:.2f}x")
    print(f"peak resident memory of this process: {peak_rss_mib():,.0f} MiB")
    if device == "cuda":
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        print(f"compiled steps that ran without CUDA graphs: {skips}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
