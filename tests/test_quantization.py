"""Weight-only int8 / int4: error against bf16, the kernels against dequantized weights, checkpoints."""

import json

import pytest
import torch
from helpers import random_ids, tiny_lm

from glm4 import Glm4ForCausalLM
from glm4.quantization import Int4Linear, Int8Linear, quantize


def bf16_lm(**overrides):
    return tiny_lm(seed=1, hidden_size=128, intermediate_size=256, **overrides).to(torch.bfloat16)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_kernel_equals_dequantized_weights(cls):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True).to(torch.bfloat16)
    q = cls.from_linear(linear)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), q.dequantize(), linear.bias.float())
    assert (q(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()
    # Error of the weights themselves, relative to the largest |w|: half a step, i.e. int8 (symmetric,
    # per channel) 1/254 and int4 (a group's range, up to 2 max|w|, in 15 steps) 1/15, plus the
    # bf16 rounding of the scales (2^-8).
    err = (q.dequantize() - linear.weight.float()).abs().max() / linear.weight.float().abs().max()
    assert err <= (1 / 254 if cls is Int8Linear else 1 / 15) + 2**-8


@pytest.mark.parametrize("width", [200, 72])
def test_int8_layers_of_any_width(width):
    """torch's CPU int8 kernel crashes (SIGSEGV, torch 2.13) on inputs of a width that is not a
    multiple of 16: such layers take the dequantized matmul."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(width, 96, bias=False).to(torch.bfloat16)
    q = Int8Linear.from_linear(linear)
    x = torch.randn(5, width, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), q.dequantize())
    assert (q(x).float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("method,tolerance", [("int8", 0.05), ("int4", 0.3)])
def test_logit_error_against_bf16(method, tolerance):
    """Measured on this tiny model: int8 max |diff| ~1% and int4 ~10% of the logit range."""
    model = bf16_lm()
    ids = random_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits.float()
        quantize(model, method)
        out = model(ids).logits.float()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert 0 < rel <= tolerance
    assert isinstance(model.lm_head, Int8Linear if method == "int8" else Int4Linear)
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, Int8Linear if method == "int8" else Int4Linear)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, method):
    model = bf16_lm()
    model.save_pretrained(tmp_path / "bf16")
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization=method)
    ids = random_ids(1, 10)
    with torch.no_grad():
        expected = loaded(ids).logits
    loaded.save_pretrained(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "glm4", "method": method, "group_size": 64}
    again = Glm4ForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
    size = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    full = sum(f.stat().st_size for f in (tmp_path / "bf16").glob("*.safetensors"))
    assert size < full
    with pytest.raises(ValueError, match="already quantized"):
        Glm4ForCausalLM.from_pretrained(tmp_path / "q", quantization="int8" if method == "int4" else "int4")


def float32_quantized(method: str):
    # float32 activations: the compiled int8 path sums in another order than the library kernel,
    # and a tiny random model in bf16 has near-ties that such rounding differences flip.
    model = tiny_lm(seed=1, hidden_size=128, intermediate_size=256, initializer_range=0.2)
    return quantize(model, method)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_generation_compiled_equals_eager(method):
    model = float32_quantized(method)
    ids = random_ids(1, 6)
    eager = model.generate(ids, max_new_tokens=12, eos_token_id=[], compile=False)
    compiled = model.generate(ids, max_new_tokens=12, eos_token_id=[], compile=True)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_batch_generates_each_row_as_alone(method):
    # The last position of a batch is a strided slice of the hidden states: the kernels get it whole.
    model = float32_quantized(method)
    ids = random_ids(2, 6)
    batch = model.generate(ids, max_new_tokens=6, eos_token_id=[], compile=False)
    for row in range(2):
        alone = model.generate(ids[row : row + 1], max_new_tokens=6, eos_token_id=[], compile=False)
        assert torch.equal(batch[row : row + 1], alone)


def test_bad_quantization_requests(tmp_path):
    with pytest.raises(ValueError, match="quantization 'int3' is not one of int8, int4"):
        quantize(bf16_lm(), "int3")
    with pytest.raises(ValueError, match="tied embeddings"):
        quantize(bf16_lm(tie_word_embeddings=True), "int8")
    with pytest.raises(ValueError, match="group_size must be"):
        quantize(bf16_lm(), "int4", group_size=48)
    config = tiny_lm().config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        Glm4ForCausalLM.from_pretrained(tmp_path)


def test_int4_layers_meet_tinygemms_contract(monkeypatch):
    """On CUDA int4 layers run tinygemm (`_weight_int4pack_mm`), which this CPU cannot: checked
    against a stand-in that unpacks and dequantizes as torch documents the kernel (bytes of
    (N, K/2), the even column in the high nibble; w = (q - 8) * scale + zero with scales and zeros
    as (K / group, N, 2)), run where the CPU kernel would. It must give the dequantized product."""
    from glm4 import kernels, quantization

    def pack(layout, inner_k_tiles):
        assert layout.dtype == torch.uint8 and layout.is_contiguous() and inner_k_tiles == 8
        return layout.clone()

    def matmul(x, packed, group_size, scales_and_zeros):
        q = torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(1).float()  # (N, K)
        scales, zeros = scales_and_zeros.float().repeat_interleave(group_size, 0).unbind(-1)  # (K, N)
        return (x.float() @ ((q - 8) * scales.T + zeros.T).T).to(x.dtype)

    monkeypatch.setitem(
        quantization.INT4_KERNELS, "cpu", quantization.INT4_KERNELS["cuda"]._replace(pack=pack, matmul=matmul)
    )
    monkeypatch.setattr(kernels, "can_int4", lambda *args: False)
    torch.manual_seed(0)
    for group_size in (32, 128):
        linear = torch.nn.Linear(256, 96, bias=True).to(torch.bfloat16)
        q = Int4Linear.from_linear(linear, group_size)
        assert q.packed_for == "cpu"
        x = torch.randn(3, 256, dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.float(), q.dequantize(), linear.bias.float())
        assert (q(x).float() - ref).abs().max() <= 0.01 * ref.abs().max()
    narrow = Int4Linear.from_linear(torch.nn.Linear(192, 96).to(torch.bfloat16))  # 192: not tiles of 128
    assert narrow.packed is None and narrow.packed_for is None


def test_int4_layout_is_made_again_on_another_kind_of_device(monkeypatch):
    """The packed layout belongs to one kernel, for one kind of device: a move within the kind keeps
    it; a move to a kind without a kernel drops it (the layer dequantizes); a move to a kind with
    one packs again, from the moved weight (the meta device stands in for CUDA here)."""
    from glm4 import quantization

    torch.manual_seed(0)
    q = Int4Linear.from_linear(torch.nn.Linear(128, 96, bias=False).to(torch.bfloat16))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    packed = q.packed
    q.to(torch.float32).to(torch.bfloat16)
    assert q.packed is packed and q.packed_for == "cpu"
    q.to("meta")
    assert q.packed is None and q.packed_for is None and q(x.to("meta")).shape == (3, 96)

    q = Int4Linear.from_linear(torch.nn.Linear(128, 96, bias=False).to(torch.bfloat16))
    packs = []
    fake = quantization.INT4_KERNELS["cpu"]._replace(
        pack=lambda layout, tiles: packs.append(layout) or layout
    )
    monkeypatch.setitem(quantization.INT4_KERNELS, "meta", fake)
    q.to("meta")
    assert q.packed_for == "meta" and q.packed.device.type == "meta"
    assert len(packs) == 1 and packs[0].device.type == "meta" and packs[0].shape == (96, 128)


def test_int4_layers_dequantize_where_torchs_kernel_fails(monkeypatch, caplog):
    """A torch build whose packed int4 kernel is missing (or a GPU it does not run on) leaves the
    layers on the dequantized matmul, with a warning, instead of failing to load."""
    from glm4 import kernels, quantization

    def missing(layout, inner_k_tiles):
        raise RuntimeError("_convert_weight_to_int4pack is not available in this build")

    monkeypatch.setitem(
        quantization.INT4_KERNELS, "cpu", quantization.INT4_KERNELS["cpu"]._replace(pack=missing)
    )
    monkeypatch.setattr(kernels, "can_int4", lambda *args: False)
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=False).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="glm4"):
        q = Int4Linear.from_linear(linear)
    assert q.packed is None and q.packed_for is None
    assert "dequantize into the matmul" in caplog.text and "not available in this build" in caplog.text
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.allclose(q(x).float(), torch.nn.functional.linear(x.float(), q.dequantize()), atol=0.05)


def test_compiled_int8_rows_take_torchs_kernel_where_inductor_reads_int8_slowly(monkeypatch):
    """Where inductor's vectors are AVX2 (its int8 multiply-reduce reads the weight at 1-2 GB/s there),
    a compiled batch-1 step multiplies int8 layers with torch's kernel instead: the same tokens."""
    from torch.profiler import profile

    from glm4 import quantization
    from glm4.generation import stream_tokens

    model = quantize(tiny_lm(hidden_size=128, intermediate_size=256).bfloat16(), "int8")
    ids = random_ids(1, 12)  # a prompt of more than 8 rows: the int8 weight widened into the matmul
    eager = torch.stack(list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=False)), 1)
    monkeypatch.setattr(quantization, "_checked_inductor", True)
    monkeypatch.setattr(quantization, "int8_reduce_compiles_well", False)
    list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=True))  # compiles
    with profile() as prof:
        compiled = torch.stack(
            list(stream_tokens(model, ids, max_new_tokens=6, eos_token_id=[], compile=True)), 1
        )
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_weight_int8pack_mm")
    # q, k, v, o, gate_up and down in each layer and the head, in each of 5 decode steps; the
    # prompt's last-row head
    assert calls == 5 * (6 * model.config.num_hidden_layers + 1) + 1
    assert torch.equal(compiled, eager)
