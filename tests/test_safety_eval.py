"""Safety eval (issue 22): suites read strictly and split disjointly, jailbreak wrappers, the runner."""

from __future__ import annotations

import json

import pytest

from gptstack.safety.suites import SUITES, SuiteError, load_suite, normalise, split_key


def test_builtin_split_is_disjoint_and_covers_every_row():
    for side in ("harmful", "benign"):
        train, held = load_suite(f"{side}-train"), load_suite(f"{side}-eval")
        assert {split_key(r["prompt"]) for r in train}.isdisjoint(split_key(r["prompt"]) for r in held)
        assert len(train) + len(held) == len(load_suite(side))
        assert 0.4 < len(held) / len(load_suite(side)) < 0.6
    every = load_suite("harmful") + load_suite("benign")
    assert len({normalise(r["prompt"]) for r in every}) == len(every)  # deduplicated across sources
    assert len(load_suite("harmbench")) == 200 and len(load_suite("advbench")) == 520
    assert {r["label"] for r in load_suite("refusal-eval")} == {"safe", "unsafe"}
    assert load_suite("harmful-eval") == load_suite("harmful-eval")  # deterministic


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "hi", "label": "benign", "category": "x"}', "'label' must be"),
        ('{"prompt": "", "label": "safe", "category": "x"}', "'prompt' must be"),
        ('{"prompt": "hi", "lable": "safe", "category": "x"}', "unknown key"),
        (
            '{"prompt": "hi", "label": "safe", "category": "x", "turns": [{"role": "assistant", "content": "a"}]}',
            "ending with a user turn",
        ),
        ('{"prompt": "hi", "label": "safe"', "not valid JSON"),
    ],
)
def test_a_malformed_row_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "fine", "label": "safe", "category": "x"}\n' + line + "\n")
    with pytest.raises(SuiteError, match=rf"mine.jsonl:2: .*{problem}"):
        load_suite(path)


def test_a_suite_file_reads_with_ids_and_turns(tmp_path):
    rows = [
        {"prompt": "a", "label": "safe", "category": "x"},
        {"prompt": "b", "label": "unsafe", "category": "y", "id": "q", "turns": [{"role": "user", "content": "b"}]},
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_suite(path)
    assert [r["id"] for r in got] == ["s-1", "q"] and got[1]["turns"][0]["content"] == "b"
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("no-such-suite")
    assert "refusal-eval" in SUITES
