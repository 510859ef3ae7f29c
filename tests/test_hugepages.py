"""Large CPU tensors (loaded weights, quantized weights, KV caches) sit on huge-page-advised memory."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, tiny_lm

from glm4 import Glm4ForCausalLM, hugepages
from glm4.cache import StaticCache

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def advised(t: torch.Tensor) -> bool:
    """Whether t's first byte is 2 MiB-aligned in a range the kernel lists as MADV_HUGEPAGE ("hg")."""
    if t.data_ptr() % hugepages.HUGE_PAGE:
        return False
    address, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()[1:]
    return False


@needs_thp
def test_empty_advises_whole_huge_pages_and_small_tensors_stay_plain():
    big = hugepages.empty((3 << 20,), torch.uint8)
    assert big.shape == (3 << 20,) and advised(big)
    big.fill_(7)  # the memory is usable to its last byte
    assert int(big[-1]) == 7
    assert not advised(hugepages.empty((1024,), torch.float32))


@needs_thp
def test_adopt_copies_large_tensors_and_leaves_the_rest():
    t = torch.randn(1024, 1024)  # 4 MiB
    moved = hugepages.adopt(t)
    assert advised(moved) and torch.equal(moved, t) and moved.data_ptr() != t.data_ptr()
    assert hugepages.adopt(moved) is moved  # already there
    small = torch.randn(16)
    assert hugepages.adopt(small) is small
    strided = t.t()
    assert hugepages.adopt(strided) is strided


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("GLM4_HUGE_PAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        t = torch.randn(1024, 1024)
        assert not hugepages.available() and hugepages.adopt(t) is t
        assert hugepages.empty((4 << 20,), torch.uint8).untyped_storage().nbytes() == 4 << 20
    finally:
        monkeypatch.delenv("GLM4_HUGE_PAGES")
        hugepages._madvise.cache_clear()


def load_without_huge_pages(monkeypatch, *args, **kwargs):
    monkeypatch.setenv("GLM4_HUGE_PAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        return Glm4ForCausalLM.from_pretrained(*args, **kwargs)
    finally:
        monkeypatch.delenv("GLM4_HUGE_PAGES")
        hugepages._madvise.cache_clear()


@needs_thp
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_loaded_weights_and_caches_are_on_huge_pages(tmp_path, monkeypatch, quantization):
    # vocab 32768 x hidden 128: an 8 MiB embedding and head in bf16 (2 MiB and more quantized).
    shape = dict(vocab_size=32768, hidden_size=128, intermediate_size=128, head_dim=32)
    tiny_lm(**shape).to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = Glm4ForCausalLM.from_pretrained(tmp_path, quantization=quantization)
    plain = load_without_huge_pages(monkeypatch, tmp_path, quantization=quantization)
    heads = [m.lm_head.packed if quantization == "int4" else m.lm_head.weight for m in (loaded, plain)]
    assert advised(loaded.model.embed_tokens.weight) and advised(heads[0])
    assert not advised(plain.model.embed_tokens.weight) and not advised(heads[1])
    ids = random_ids(2, 6, 32768)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, plain(ids).logits)

    cache = StaticCache(1, 1, 2, 8192, 64, torch.float32, "cpu")  # 4 MiB of keys
    assert advised(cache.keys[0]) and not cache.keys[0].any()
