"""``python -m tools compare`` on tiny random models saved to temporary folders: LLaVA-1.5,
LLaVA-NeXT (AnyRes crops, ``image_sizes``) and Qwen2.5-VL (``image_grid_thw``)."""

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


def compare(folder, tmp_path, methods: str, budget: str) -> tuple[dict, dict, str]:
    out = tmp_path / "result.json"
    code = main(
        [
            "compare", "--model", str(folder), "--methods", methods, "--budget", budget,
            "--samples", "2", "--batch", "2", "--repeat", "1", "--new-tokens", "2",
            "-o", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert result["versions"]["transformers"] and result["device"]["type"] == "cpu"
    return result, {(r["method"], r["keep"]): r for r in result["results"]}, out


def test_compare_loads_a_saved_llava_next_and_budgets_each_crop(tmp_path, capsys):
    from tests.reference.test_attach_llava_next import tiny_next

    folder = tmp_path / "llava_next"
    tiny_next().save_pretrained(folder)
    result, rows, _ = compare(folder, tmp_path, "random_pruning,visionzip,fastv", "4")
    # a 32x64 image (the first pinpoint): base crop and 1x2 tiles, 16 + 4 x (8 + 1) tokens
    assert result["family"] == "llava_next"
    assert result["shapes"]["crops_per_image"] == 3 and result["shapes"]["visual_tokens"] == 52
    for row in rows.values():  # 4 per crop; fastv in the decoder keeps the same total
        assert "refused" not in row and row["visual_tokens"] == 12
        assert row["gflops"] < result["dense"]["gflops"]
    assert "| random_pruning (baseline) | 4 | 12.0 |" in capsys.readouterr().out


def test_compare_loads_a_saved_qwen2_5_vl_and_refuses_what_it_cannot_give(tmp_path, capsys):
    from tests.reference.test_attach_qwen2_5_vl import tiny_qwen

    folder = tmp_path / "qwen"
    tiny_qwen().save_pretrained(folder)
    result, rows, _ = compare(folder, tmp_path, "random_pruning,visionzip", "4")
    assert result["family"] == "qwen2_5_vl"
    assert result["shapes"]["visual_tokens"] == 576  # a 24x24 grid of merged tokens
    kept = rows[("random_pruning", 4)]
    assert kept["visual_tokens"] == 4 and kept["gflops"] < result["dense"]["gflops"]
    assert 0 <= kept["top1_agreement"] <= 1 and kept["kl_first_token"] >= 0
    assert "no CLS token" in rows[("visionzip", 4)]["refused"]
    assert "| visionzip | 4 | refused:" in capsys.readouterr().out


def test_a_folder_of_an_unsupported_family_is_refused_with_the_supported_ones(tmp_path, capsys):
    folder = tmp_path / "blip"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]}'
    )
    out = tmp_path / "result.json"
    argv = ["compare", "--model", str(folder), "--methods", "visionzip", "--budget", "4"]
    assert main([*argv, "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model_type 'blip-2'" in err and "Blip2ForConditionalGeneration" in err
    assert "llava, llava_next, qwen2_vl, qwen2_5_vl" in err
    assert not out.exists()


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
