"""Tokenizer and chat-template parity with transformers on a GLM-layout tokenizer built here."""

import pytest
import torch
from helpers import build_test_tokenizer_folder

from glm4.tokenizer import Glm4Tokenizer

TEXTS = [
    "Hello world!",
    "北京是中国的首都，你好！",
    "emoji 🙂🚀 and ümlauts",
    "def f(x):\n    return x  # code\n\n\n\t\ttabs   and   spaces  ",
    "[gMASK]<sop><|user|>\nhi<|assistant|>",
    "",
]

MESSAGES = {
    "system_multi_turn": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of China? 中国"},
    ],
    "tool_call_history": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"weather": "sunny", "温度": 20}'},
    ],
    "reasoning_history": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "\nadd one and one\n</think>\n\n2"},
        {"role": "user", "content": "2+2?"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询天气 (weather)",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_test_tokenizer_folder(folder)
    return Glm4Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), folder


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, hf = pair[0], pair[1]
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids_after_the_bpe_ranks(pair):
    ours = pair[0]
    ids = ours.encode("[gMASK]<sop><|user|>")
    assert len(ids) == 3 and min(ids) >= 400
    assert ours.stop_token_ids == [
        ours.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    assert ours.pad_token_id == ours.token_to_id("<|endoftext|>")


def test_batch_left_padding_matches_transformers(pair):
    ours, hf = pair[0], pair[1]
    hf.padding_side = "left"
    batch = ours(["a", "Hello world! 你好"])
    ref = hf(["a", "Hello world! 你好"], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    assert batch["attention_mask"][0, 0] == 0  # padded on the left


@pytest.mark.parametrize("name", MESSAGES)
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
def test_chat_template_matches_transformers(pair, name, tools):
    ours, hf = pair[0], pair[1]
    messages = MESSAGES[name]
    text = ours.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    ids = ours.apply_chat_template(messages, tools=tools)
    assert ids == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert text.startswith("[gMASK]<sop>") and text.count("[gMASK]<sop>") == 1
    assert ids[:2] == ours.encode("[gMASK]<sop>") and ids.count(ids[0]) == 1


def test_glm4_template_format(pair):
    ours = pair[0]
    text = ours.apply_chat_template(MESSAGES["tool_call_history"], tools=TOOLS, tokenize=False)
    assert text.startswith(
        '[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{\n    "name": "get_weather",'
    )
    assert '"description": "查询天气 (weather)"' in text  # ensure_ascii off
    assert (
        "\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nWhat is the weather in Paris?" in text
    )
    assert text.endswith(
        '<|assistant|>get_weather \n{"city": "Paris"}'
        '<|observation|>\n{"weather": "sunny", "温度": 20}<|assistant|>'
    )
    plain = ours.apply_chat_template(
        MESSAGES["system_multi_turn"], tokenize=False, add_generation_prompt=False
    )
    assert plain == (
        "[gMASK]<sop><|system|>\nYou are helpful.<|user|>\nWhat is the capital of France?"
        "<|assistant|>\nParis.<|user|>\nAnd of China? 中国"
    )


def test_z1_template_keeps_only_the_answer_and_opens_think(tmp_path):
    from transformers import AutoTokenizer

    build_test_tokenizer_folder(tmp_path, chat_template="glm-z1")
    ours, hf = Glm4Tokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = MESSAGES["reasoning_history"]
    text = ours.apply_chat_template(messages, tokenize=False)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]<sop><|user|>\n1+1?<|assistant|>\n2<|user|>\n2+2?<|assistant|>\n<think>"


def test_no_template_is_a_clear_error_and_builtins_can_be_chosen(tmp_path):
    build_test_tokenizer_folder(tmp_path, chat_template=None)
    tok = Glm4Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no chat template.*chat_template='glm4'"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Glm4Tokenizer.from_pretrained(tmp_path, chat_template="glm4")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).endswith(
        "hi<|assistant|>"
    )
    with pytest.raises(ValueError, match="unknown built-in chat template"):
        Glm4Tokenizer.from_pretrained(tmp_path, chat_template="chatml")


def test_template_errors_are_clear(pair):
    ours = pair[0]
    with pytest.raises(ValueError, match="must be a dict with a 'role'"):
        ours.apply_chat_template(["hi"])
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="unknown message role: wizard"):
        ours.apply_chat_template([{"role": "wizard", "content": "hi"}])


@pytest.mark.parametrize("text", TEXTS[:4])
def test_incremental_decoder_never_emits_half_a_character(pair, text):
    ours = pair[0]
    decoder = ours.stream_decoder()
    deltas = [decoder.add(i) for i in ours.encode(text)] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
