"""Tool-call and reasoning parsing, whole and streamed, equal however the text is chunked."""

import json
import random

import pytest

from glm4.chat import StreamParser, parse_output, parse_tool_calls, split_reasoning

ONE_CALL = 'get_weather\n{"city": "Paris"}<|observation|>'
TWO_CALLS = 'get_weather\n{"city": "Paris"}<|assistant|>get_time\n{"zone": "Europe/Paris", "n": [1, 2]}'


def test_one_call():
    out = parse_tool_calls(ONE_CALL)
    assert out.content == "" and len(out.tool_calls) == 1
    call = out.tool_calls[0].to_openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_several_calls():
    out = parse_tool_calls(TWO_CALLS)
    assert [c.name for c in out.tool_calls] == ["get_weather", "get_time"]
    assert json.loads(out.tool_calls[1].arguments) == {"zone": "Europe/Paris", "n": [1, 2]}
    assert len({c.id for c in out.tool_calls}) == 2


def test_history_style_call_with_a_space_after_the_name():
    assert parse_tool_calls('get_weather \n{"city": "Paris"}').tool_calls[0].name == "get_weather"


@pytest.mark.parametrize(
    "text",
    [
        "\nThe capital of France is Paris.",
        'get_weather\n{"city": "Par',  # cut off: malformed JSON stays text
        "get_weather\n[1, 2]",  # arguments must be an object
        'Sure.\nHere it is: {"a": 1}',
        "",
    ],
)
def test_plain_or_malformed_stays_text(text):
    out = parse_tool_calls(text)
    assert out.tool_calls == [] and out.content == text


def test_text_then_call():
    out = parse_tool_calls('\nLet me check.<|assistant|>get_weather\n{"city": "Paris"}')
    assert out.content == "\nLet me check." and out.tool_calls[0].name == "get_weather"
    assert parse_output("\nLet me check.<|assistant|>a\n{}", tools=True).content == "Let me check."


def test_reasoning():
    assert split_reasoning("\nthink hard\n</think>\n\nParis") == ("\nthink hard\n", "Paris")
    assert split_reasoning("still thinking, cut off") == ("still thinking, cut off", "")
    out = parse_output('\nneed weather\n</think>\nget_weather\n{"city": "Paris"}', reasoning=True, tools=True)
    assert out.reasoning == "\nneed weather\n" and out.tool_calls[0].name == "get_weather"
    assert parse_output("no think here").reasoning is None


TEXTS = [
    ("\nThe capital of France is Paris.", False, True),
    (ONE_CALL, False, True),
    (TWO_CALLS, False, True),
    ('\nLet me check.<|assistant|>get_weather\n{"city": "Paris"}<|observation|>', False, True),
    ('get_weather\n{"city": "Par', False, True),
    ("a<|assist text <|observation|> more<|observation|>", False, True),
    ("\nreason </thin k> more\n</think>\n\nanswer with </think> inside", True, False),
    ("\nreasoning cut off </thi", True, False),
    ('\nplan\n</think>\n\nget_weather\n{"city": "Paris"}<|assistant|>\nDone.', True, True),
]


def stream(text, reasoning, tools, cuts):
    parser = StreamParser(reasoning=reasoning, tools=tools)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    content = "".join(d.content for d in deltas)
    thought = "".join(d.reasoning for d in deltas)
    calls = [(c.name, c.arguments) for d in deltas for c in d.tool_calls]
    return content, thought, calls


@pytest.mark.parametrize("text,reasoning,tools", TEXTS)
def test_stream_equals_whole_for_every_chunking(text, reasoning, tools):
    whole = parse_output(text, reasoning=reasoning, tools=tools)
    expected = (whole.content, whole.reasoning or "", [(c.name, c.arguments) for c in whole.tool_calls])
    # Every single cut point, character by character, and random chunkings.
    assert stream(text, reasoning, tools, []) == expected
    assert stream(text, reasoning, tools, list(range(1, len(text)))) == expected
    for i in range(1, len(text)):
        assert stream(text, reasoning, tools, [i]) == expected
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        assert stream(text, reasoning, tools, cuts) == expected


def test_plain_answers_stream_as_they_come():
    parser = StreamParser(tools=True)
    assert parser.feed("\n").content == ""  # a reply's leading newline is dropped
    assert parser.feed("The capital").content == "The capital"
    assert parser.feed(" is Par").content == " is Par"
    assert parser.feed("is.<|assi").content == "is."  # held: could be a separator
    assert parser.finish().content == "<|assi"
    z1 = StreamParser(reasoning=True)
    assert z1.feed("\nhmm, thinking").reasoning == "\nhmm, thinking"
    assert z1.feed(" more</th").reasoning == " more"
    delta = z1.feed("ink>\n\nAnswer")
    assert delta.reasoning == "" and delta.content == "Answer"
