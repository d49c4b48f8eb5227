"""The CLI's benchmark report runs end to end (one shape, one round: a smoke run, not a timing)."""

import json
import subprocess
import sys


def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "coordconv_fused.cli", "bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| nn.Conv2d (floor)" in proc.stdout and "coordconv[torch]" in proc.stdout
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_max=0" in proc.stdout  # re-ran itself with the tunables
    report = json.loads(out.read_text())
    providers = {r["provider"] for r in report["results"]}
    assert {"nn.Conv2d (floor)", "naive cat", "coordconv[reference]", "coordconv[torch]",
            "coordconv[auto]"} <= providers
    for r in report["results"]:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
