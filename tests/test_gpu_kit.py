"""The GPU kit in CI: ``scripts/gpu_check.sh --dry-run`` runs tests/gpu in Numba's CUDA simulator and
goes through every part of the script's plumbing; and a run out of time still writes its summary,
says which part was cut, and fails."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from family_cases import CASES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
PARTS = ["gpu", "install", "inspect", "tests", "bench-float32", "bench-float32-2^27", "sanitizer",
         "bench-bfloat16-2^27", "bench-bfloat16-master-2^27", "bench-float32-many", "bench-lean-state"]


def _dry_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *extra], env=env, capture_output=True, text=True,
                          timeout=600, cwd="/")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check-out")
    return out, _dry_run(out)


def test_the_dry_run_passes_and_writes_its_files(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "gpu_check.log", "summary.json", "tests.xml"], files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True
    assert summary["files"] == files and len(files) <= 8
    assert [p["name"] for p in summary["parts"]] == PARTS
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert status["tests"] == status["bench-float32"] == status["sanitizer"] == "passed", status
    ran = ("gpu", "tests", "bench-float32", "sanitizer")
    assert all(s == "not-run" for n, s in status.items() if n not in ran), status
    assert "OK in" in proc.stdout and "=== gpu check summary ===" in proc.stdout
    log = (out / "gpu_check.log").read_text()
    for name in ("tests", "bench-float32", "sanitizer"):
        assert f"----- {name} output -----" in log
    assert "numba-cuda stepped: [1]" in log  # the sanitizer's step, in the simulator


def test_the_simulator_ran_every_rule_and_skipped_only_gpu_only_tests(dry_run):
    out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    tests = summary["tests"]
    assert tests["ok"] and tests["failures"] == tests["errors"] == 0
    assert tests["passed"] >= 90, tests
    assert list(tests["skip_reasons"]) == ["GPU only: Numba's CUDA simulator has no CuPy, torch CUDA, streams, "
                                           "graphs or driver"]
    names = [case.get("name") for case in ET.parse(out / "tests.xml").getroot().iter("testcase")]
    every_rule = [n for n in names if n.startswith("test_every_rule_and_flag_follows_the_reference[")]
    assert len(every_rule) == len(CASES)
    # the GPU-only tests are collected (so they import and parametrize) even where they cannot run
    assert any(n.startswith("test_registers_and_local_memory") for n in names)
    assert any(n.startswith("test_cupy_graph_of_one_step") for n in names)


def test_the_bench_json_goes_through_the_merging(dry_run):
    out, _ = dry_run
    bench = json.loads((out / "bench.json").read_text())
    run = bench["runs"]["bench-float32"]
    rows = [r for r in run["results"] if r["implementation"].endswith("Adam.step")]
    assert rows and all(r["status"] == "ok" and r["verified"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"]["bench-float32"]


def test_every_bench_command_of_a_gpu_run_is_one_gpuadam_bench_takes():
    """The GPU run's bench commands, at full time and cut short, parse and pass bench's checks here
    (a renamed flag would otherwise surface only on the GPU)."""
    from gpuadam.bench.command import config_from_args
    from gpuadam.cli import build_parser

    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_check

    seen = set()
    for name, args, sizes in gpu_check.BENCHES:
        for limit in (gpu_check.CAPS[name], gpu_check.CAPS[name] / 2, 0):
            argv = gpu_check.bench_args(name, sizes, args, limit)
            seen.add(argv[-1])
            ns = build_parser().parse_args(["bench", *argv, "--json", "bench.json"])
            config = config_from_args(ns)
            assert config.backends == ("numba-cuda", "cupy") and config.peers
            assert config.sweep == bool(sizes) and config.many == ("--many" in args)
    assert {"2^20,2^24", "2^27", "2^26", "2^25"} <= seen
    for argv in (gpu_check.DRY_BENCH,):
        config_from_args(build_parser().parse_args(["bench", *argv]))


def test_a_run_out_of_time_still_writes_its_summary_and_fails(tmp_path):
    proc = _dry_run(tmp_path, "--budget", "7")
    assert proc.returncode == 1, proc.stdout[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False
    assert [p["name"] for p in summary["parts"]] == PARTS
    status = {p["name"]: p["status"] for p in summary["parts"]}
    assert status["tests"] in ("timeout", "skipped") and status["bench-float32"] == "skipped", status
    assert "NOT OK" in proc.stdout
