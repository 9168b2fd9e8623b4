"""The benchmark's settings build and run, and `python -m tools bench` writes its results."""

from __future__ import annotations

import json

import pytest
import torch

from reference import registry
from reference.core import TokenReducer
from reference.hosts import vit
from tools.bench_reference import build_reducers, run

BENCHMARKED = [
    e
    for e in registry.entries()
    if issubclass(e.cls, TokenReducer) and e.cls.paper_setting(12, 384)[0]
]


@pytest.mark.parametrize("entry", BENCHMARKED, ids=[e.catalog_id for e in BENCHMARKED])
def test_paper_setting_runs_on_vit_small(entry):
    torch.manual_seed(0)
    host = vit.create("vit_small_patch16_224").eval()
    reducers, proportional, setting = build_reducers(entry, 12, host.embed_dim)
    assert setting and all(0 <= int(layer) < 12 for layer in setting)
    vit.apply(host, reducers, proportional)
    with torch.no_grad():
        logits = host(torch.randn(1, 3, 224, 224))
    assert torch.isfinite(logits).all()
    assert vit.tokens_after(host)[-1] < 197


def test_bench_writes_results_with_device_versions_and_shapes(tmp_path):
    out = tmp_path / "reference-cpu.json"
    result = run(
        "cpu",
        ("vit_tiny_patch16_224",),
        (1,),
        "tome",
        repeat=1,
        warmup=0,
        output=out,
        progress=False,
    )
    saved = json.loads(out.read_text())
    assert saved == result
    assert saved["device"]["type"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    (row,) = saved["results"]
    assert row["model"] == "vit_tiny_patch16_224" and row["tokens_in"] == 197
    assert row["tokens_final"] < 197 and row["gflops"] < row["base_gflops"]
    assert row["speedup"] == pytest.approx(row["base_ms"] / row["method_ms"], rel=1e-2)


VLM_BENCHMARKED = [e for e in registry.entries() if getattr(e.cls, "bench_setting", None)]


@pytest.mark.parametrize("entry", VLM_BENCHMARKED, ids=[e.catalog_id for e in VLM_BENCHMARKED])
def test_vlm_bench_setting_keeps_the_budget_on_the_llava_host(entry):
    from reference.hosts.llava import TINY, LlavaHost, bench_setting
    from tests.reference.test_vlm_contract import inputs

    torch.manual_seed(0)
    host = LlavaHost(TINY).eval()
    setting = bench_setting(entry.cls, 4, 16, TINY)
    host.apply(**{k: v.eval() if k == "vision" else v for k, v in setting.items()})
    images, prefix, suffix, valid = inputs()
    text = torch.randn(3, 8, TINY.vision["embed_dim"])
    with torch.no_grad():
        _, cache = host.prefill(images, prefix, suffix, valid, state={"text": text})
    image_tokens = cache["layers"][-1]["valid"].shape[1] - 2 - 5
    assert 4 <= image_tokens <= 5  # TRIM adds one averaged token to its budget


def test_projector_bench_compares_each_count_with_the_mlp():
    from tools.bench_projector import run_projector

    result = run_projector("cpu", "deco", repeat=1, warmup=0, progress=False)
    json.dumps(result)  # the results file is plain JSON
    assert result["device"]["type"] == "cpu" and result["compressor"]["tokens_in"] == 576
    rows = {row["tokens_out"]: row for row in result["results"]}
    assert set(rows) == {64, 144} and rows[64]["setting"] == {"query_num": 64}
    for row in rows.values():
        # DeCo pools before its MLP: fewer FLOPs than the MLP on all 576 tokens.
        assert row["gflops"] < row["base_gflops"] and row["params_m"] == row["base_params_m"]
        assert row["prefill_speedup"] == pytest.approx(
            row["base_prefill_ms"] / row["prefill_ms"], rel=1e-2
        )


def test_bench_refuses_an_unknown_suite(capsys):
    from tools.cli import main

    assert main(["bench", "--suite", "vit,projectors"]) == 1
    assert "unknown suite(s) projectors" in capsys.readouterr().err
