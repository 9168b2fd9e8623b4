"""``python -m tools compare`` on a tiny random LLaVA saved to a temporary folder."""

from __future__ import annotations

import json

import pytest

from tools.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.reference.test_attach_transformers import tiny_llava

    folder = tmp_path_factory.mktemp("llava")
    tiny_llava().save_pretrained(folder)
    return folder


def test_compare_writes_a_table_json_and_plot(checkpoint, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(
        [
            "compare", "--model", str(checkpoint), "--methods",
            "visionzip,random_pruning,spatial_pooling,mustdrop", "--budget", "4,8",
            "--samples", "2", "--batch", "2", "--repeat", "1", "--new-tokens", "2",
            "-o", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["versions"]["transformers"] and result["device"]["type"] == "cpu"
    assert result["shapes"]["visual_tokens"] == 16 and result["shapes"]["samples"] == 2
    rows = {(r["method"], r["keep"]): r for r in result["results"]}
    assert rows[("visionzip", 4)]["visual_tokens"] == 4
    assert rows[("spatial_pooling", 8)]["baseline"] is True
    for row in result["results"]:
        if "refused" not in row:
            assert row["prefill_ms"] > 0 and 0 <= row["top1_agreement"] <= 1
            assert row["kl_first_token"] >= 0 and row["gflops"] < result["dense"]["gflops"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| visionzip | 4 | 4.0 |" in table and "random_pruning (baseline)" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/nonexistent"], "not a save_pretrained checkpoint folder"),
        (["--methods", "no_such_method"], "no reference implementation for no_such_method"),
        (["--budget", "0"], "--budget must be positive"),
        (["--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(checkpoint, tmp_path, capsys, argv, message):
    args = {"--model": str(checkpoint), "--methods": "visionzip", "--budget": "4"}
    args.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    out = tmp_path / "result.json"
    flat = [part for pair in args.items() for part in pair]
    assert main(["compare", *flat, "-o", str(out), "--quiet", "--repeat", "1"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_malformed_questions_file_names_its_line_and_field(checkpoint, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"image": "a.png", "question": "What?"}\n{"image": "b.png"}\n')
    out = tmp_path / "result.json"
    argv = ["compare", "--model", str(checkpoint), "--methods", "visionzip", "--budget", "4"]
    assert main([*argv, "--questions", str(questions), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{questions}:2: question: missing or not a string" in err
    assert not out.exists()
