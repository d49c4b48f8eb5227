"""The CLI's benchmark report runs end to end (one shape, one round: a smoke run, not a timing)."""

import json
import os
import subprocess
import sys

import torch

from coordconv_fused import call_cost


def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "coordconv_fused.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    assert "| nn.Conv2d (floor)" in proc.stdout and "coordconv[torch]" in proc.stdout
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_max=0" in proc.stdout  # re-ran itself with the tunables
    report = json.loads(out.read_text())
    providers = {r["provider"] for r in report["results"]}
    assert {
        "nn.Conv2d (floor)",
        "naive cat",
        "coordconv[reference]",
        "coordconv[torch]",
        "coordconv[auto]",
    } <= providers
    timed = [r for r in report["results"] if r["mode"] != "memory"]
    assert {r["mode"] for r in timed} == {"forward", "forward+backward"}
    for r in timed:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    memory = {r["provider"]: r for r in report["results"] if r["mode"] == "memory"}
    # The naive concatenation holds its concatenated input for backward; CoordConv does not.
    assert memory["naive cat"]["held_bytes"] > memory["nn.Conv2d (floor)"]["held_bytes"]
    # The torch backend may hold its cached batch-of-one coordinate image ([1, 2, H, W]), never more.
    assert memory["coordconv[torch]"]["held_bytes"] <= memory["nn.Conv2d (floor)"]["held_bytes"] + 2 * 64 * 64 * 4
    assert memory["coordconv[auto]"]["held_bytes"] <= memory["nn.Conv2d (floor)"]["held_bytes"]
    assert memory["coordconv[torch]"]["peak_bytes"] > 0
    # A smoke run states no verdict on the targets.
    assert "not judged: 1 round(s) is a smoke run" in proc.stdout
    assert {r["calls_per_sample"] for r in timed} == {1} and "one call per sample" in proc.stdout
    assert "all met" not in proc.stdout and "missed" not in proc.stdout
    assert "AVX" in report["machine"]["processor"] or "AVX" not in open("/proc/cpuinfo").read().upper()


def test_bench_isa_avx2_limits_every_library(tmp_path):
    """``--isa avx2``: the run states the caps, and no AVX-512 kernel of ours is chosen."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COORDCONV_NO_AVX512")}
    proc = subprocess.run(
        [sys.executable, "-m", "coordconv_fused.cli", "bench", "--quick", "--isa", "avx2", "--no-memory",
         "--no-call-cost", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env=env,
    )  # fmt: skip
    assert "COORDCONV_NO_AVX512=1 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in report["machine"]["processor"]
    chosen = {c["chosen"] for c in report["kernel_choices"]}
    assert chosen and "avx512_direct" not in chosen


def test_cli_help_is_plain_text():
    for args in ([], ["bench"], ["paper"]):
        proc = subprocess.run(
            [sys.executable, "-m", "coordconv_fused.cli", *args, "--help"], capture_output=True, text=True, check=True
        )
        assert "``" not in proc.stdout
        if args == ["paper"]:
            for option in ("--epochs", "--attempts", "--baseline-epochs", "--threads", "--out", "--split"):
                line = next(line for line in proc.stdout.splitlines() if line.strip().startswith(option))
                assert "default" in line or "default" in proc.stdout.split(option, 2)[-1].split("\n  -")[0], option


def test_missing_tool_dependency_names_the_extra(monkeypatch):
    from coordconv_fused import cli

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "matplotlib" else object())
    try:
        cli._require("bench", "tqdm", "matplotlib")
    except SystemExit as e:
        assert "pip install 'coordconv-fused[bench]'" in str(e) and "matplotlib" in str(e)
    else:
        raise AssertionError("no exit for a missing dependency")


def _compiled_result(compiled_us: float, eager_us: float) -> dict:
    def entry(us, ratio):
        return {"median_us": us, "min_us": us, "max_us": us, "ratio": ratio, "ratio_min": ratio, "ratio_max": ratio}

    results = {
        "Conv2d + ReLU": entry(compiled_us, 1.0),
        "CoordConv2d + ReLU": entry(1.02 * compiled_us, 1.02),
        call_cost.EAGER: entry(eager_us, eager_us / compiled_us),
    }
    return {"shape": [8, 64, 56, 56], "device": "cpu", "torch": torch.__version__, "rounds": 5, "results": results}


def test_compiled_report_flags_a_compiled_convolution_slower_than_eager():
    """The compiled comparison gives the eager Conv2d + ReLU beside it, and says so where the compiled
    convolution itself is far slower than eager (then the ratio measures that, not the layer)."""
    normal = call_cost.format_compiled(_compiled_result(5_000.0, 5_200.0))
    assert "1.020×" in normal and "Eager Conv2d + ReLU: 5.200 ms" in normal and "slower than eager" not in normal
    slow = call_cost.format_compiled(_compiled_result(280_000.0, 9_000.0))
    assert "runs 31.1× slower than eager" in slow


def test_a_timed_sample_is_a_run_of_calls_without_accumulated_gradients():
    """``bench`` times each sample as consecutive calls (as many as make the fastest provider's run
    last SAMPLE_SECONDS); forward+backward resets the gradients before each call."""
    from coordconv_fused import benchmark

    assert benchmark.calls_per_sample(0.001, 0.03) == 30
    assert benchmark.calls_per_sample(0.05, 0.03) == 1
    assert benchmark.calls_per_sample(1e-9, 0.03) == 200  # (capped)
    assert benchmark.calls_per_sample(0.001, 0) == 1  # (a smoke run)

    conv = torch.nn.Conv2d(3, 4, 3)
    calls = []
    conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 8, 8)
    assert benchmark._time_calls(conv, x, "forward+backward", 3) > 0
    assert len(calls) == 3
    expected = torch.autograd.grad(conv(x).sum(), conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, expected)  # one call's gradient, not three
    fresh = x.detach().requires_grad_()
    torch.testing.assert_close(x.grad, torch.autograd.grad(conv(fresh).sum(), fresh)[0])


def _synthetic_report(floor_min_max: tuple[float, float], auto_ratio: float) -> dict:
    from coordconv_fused import benchmark

    def row(provider, median, lo, hi, ratio):
        return {
            "shape": "s",
            "shape_name": "s",
            "mode": "forward",
            "provider": provider,
            "median_ms": median,
            "min_ms": lo,
            "max_ms": hi,
            "ratio": ratio,
            "paired_ratio_median": ratio,
            "paired_ratio_min": ratio,
            "paired_ratio_max": ratio,
            "vs_naive": 0.5,
        }

    lo, hi = floor_min_max
    return {
        "rounds": 5,
        "results": [
            row(benchmark.FLOOR, 1.0, lo, hi, 1.0),
            row(benchmark.NAIVE, 2.0, 2.0, 2.0, 2.0),
            row("coordconv[auto]", auto_ratio, auto_ratio, auto_ratio, auto_ratio),
        ],
    }


def test_the_report_says_how_steady_the_floor_was():
    """A miss on a row where nn.Conv2d's own time varied much over the rounds says so; the report's
    steadiness line counts such rows."""
    from coordconv_fused import benchmark

    steady, unsteady = _synthetic_report((0.95, 1.05), 1.2), _synthetic_report((0.8, 1.6), 1.2)
    assert "steady." in benchmark.steadiness(steady) and "unsteady" not in benchmark.steadiness(steady)
    assert "2.00×" in benchmark.steadiness(unsteady) and "above 1.25× on 1 of 1 rows" in benchmark.steadiness(unsteady)
    [miss] = benchmark._target_misses(steady)
    assert "1.200× > 1.10×" in miss and "varied" not in miss
    [miss] = benchmark._target_misses(unsteady)
    assert "nn.Conv2d's own time varied 2.00× over the rounds" in miss
