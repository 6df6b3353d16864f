"""The GPU check: on a machine with a GPU, prove every kernel and bring back figures in one run.

``scripts/gpu_check.sh`` runs this with the machine's ``python3``. Parts, each timed and each with a
time limit (the run stays under ``--budget`` seconds, six minutes by default; a part that would not
fit is cut to smaller sizes or skipped, and says so):

  gpu        ``nvidia-smi``: the GPU, its driver and compute capability
  install    ``pip install --no-deps --no-build-isolation -e .`` (no network needed); the package
             is on PYTHONPATH whatever pip says
  inspect    ``gpuadam inspect --json`` for the GPU's architecture, in the background beside the
             tests (it needs only the CPU); its JSON gives the register test its predictions
  tests      ``pytest tests/gpu`` (JUnit XML), with GPUADAM_REQUIRE_ALL=1
  bench-*    ``gpuadam bench`` on numba-cuda and cupy with the GPU peers (torch ``Adam(fused=True)``
             among them): float32 at 2^20 and 2^24, and at 2^27
  sanitizer  ``compute-sanitizer --tool memcheck`` over one small step per backend, when it is here
  bench-*    bfloat16 at 2^27, with half state and with float32 master weights; 400 tensors of
             1e3 to 1e5 elements, separate and in one FlatBuffer (``--many``); lean state
             (``--state-dtype float32,bfloat16,int8``) at 2^24 with bitsandbytes' Adam8bit, if time is left

Everything goes under ``$OUT`` (else ``gpu-check-out/``): ``summary.json``, ``gpu_check.log``,
``tests.xml``, ``inspect.json``, ``bench.json``; at most ``MAX_FILES``. The summary is rewritten
after every part, so a run cut short still leaves one. Exit 0 only when every test passed (none
skipped) and no part failed or overran its limit; a bench left out for want of time is listed as
skipped.

``--dry-run`` (a machine without a GPU, and CI): the tests in Numba's CUDA simulator (the GPU-only
ones skip, and must say so), a tiny CPU bench through the same merging, and the same summary, with
every GPU part listed as not run.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "gpuadam-gpu-check/1"
MAX_FILES = 8
LOG_PART_LIMIT = 2 * 2**20  # bytes of one part's output kept in the log
#: Seconds each part may take at most (the overall budget may give it less).
CAPS = {"gpu": 20, "install": 60, "inspect": 200, "tests": 200, "bench-float32": 45, "bench-float32-2^27": 45,
        "sanitizer": 45, "bench-bfloat16-2^27": 35, "bench-bfloat16-master-2^27": 35, "bench-float32-many": 30,
        "bench-lean-state": 40}
#: The bench parts: name, gpuadam bench arguments, then the sizes to try, largest first (the first
#: that fits the time left runs: cut sizes rather than overrun).
BENCHES = [
    ("bench-float32", ["--dtype", "float32", "--rounds", "2"], ["2^20,2^24", "2^20"]),
    ("bench-float32-2^27", ["--dtype", "float32", "--rounds", "1", "--no-overhead"], ["2^27", "2^26", "2^25"]),
    ("bench-bfloat16-2^27", ["--dtype", "bfloat16", "--rounds", "1", "--no-overhead"], ["2^27", "2^26", "2^25"]),
    ("bench-bfloat16-master-2^27", ["--dtype", "bfloat16", "--master-weights", "--rounds", "1", "--no-overhead"],
     ["2^27", "2^26", "2^25"]),
    # 400 tensors: separate launches against one FlatBuffer launch and torch fused (no size sweep)
    ("bench-float32-many", ["--dtype", "float32", "--many", "--rounds", "1", "--no-overhead"], []),
    # lean state: float32, bfloat16 and int8 moments, each layout beside its own ceiling, torch fused and
    # bitsandbytes' Adam8bit (CUDA) where installed; last, so it runs only in the time left
    ("bench-lean-state", ["--dtype", "float32", "--state-dtype", "float32,bfloat16,int8", "--rounds", "1",
                          "--no-overhead"], ["2^24", "2^22"]),
]
#: The benches that run before the sanitizer (the float32 ones: the targets are float32 Adam's).
BEFORE_SANITIZER = 2
BENCH_COMMON = ["--backends", "numba-cuda,cupy", "--repeat", "3", "--min-time", "0.01", "--max-buffer-sets", "8",
                "--no-progress"]
#: One small step per backend for compute-sanitizer: capturable with clipping, so the reduction and
#: the preparation kernels run too.
SANITIZED_STEP = """
import sys
import numba
import numpy as np
from numba import cuda
import gpuadam
from gpuadam.kernels import numba_cuda
if numba.config.ENABLE_CUDASIM:  # the dry run: the simulator pays for every thread
    numba_cuda.THREADS = 32
for backend in sys.argv[1:]:
    rng = np.random.default_rng(0)
    p = cuda.to_device(rng.standard_normal(1003).astype(np.float32))
    g = cuda.to_device(rng.standard_normal(1003).astype(np.float32))
    opt = gpuadam.Adam([p], backend=backend, capturable=True, skip_nonfinite=True, amsgrad=True)
    opt.step([g], max_grad_norm=1.0)
    cuda.synchronize()
    print(backend, "stepped:", opt.steps)
"""

#: ``gpuadam inspect --json --arch ARCH`` into PARTIAL, moved to FINAL only when it succeeded.
INSPECT_TO = """
import contextlib, os, sys
from gpuadam import cli
partial, final, arch = sys.argv[1:]
with open(partial, "w") as f, contextlib.redirect_stdout(f):
    rc = cli.main(["inspect", "--json", "--arch", arch])
if rc == 0:
    os.replace(partial, final)
sys.exit(rc)
"""


@dataclass
class Part:
    name: str
    status: str = "pending"  # passed, failed, timeout, skipped, not-run (dry run)
    seconds: float = 0.0
    limit_s: float | None = None
    command: list[str] | None = None
    detail: str = ""
    extra: dict = field(default_factory=dict)


class Check:
    def __init__(self, out: Path, budget: float, dry_run: bool) -> None:
        self.out, self.budget, self.dry_run = out, budget, dry_run
        self.start = time.monotonic()
        self.started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.parts: list[Part] = []
        self.log_path = out / "gpu_check.log"
        self.log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [self.env.get("PYTHONPATH")])])
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.info: dict = {}
        self.tests: dict = {}
        self.bench: dict = {}
        self.procs: list[subprocess.Popen] = []

    # --- time ----------------------------------------------------------------------------------
    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def limit(self, name: str) -> float:
        return max(0.0, min(CAPS.get(name, 60), self.left() - 5))

    # --- output --------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def add(self, part: Part) -> Part:
        self.parts.append(part)
        self.say(f"{part.name}: {part.status} in {part.seconds:.1f}s" + (f" ({part.detail})" if part.detail else ""))
        self.write_summary()
        return part

    def write_summary(self) -> None:
        doc = {
            "schema": SCHEMA, "dry_run": self.dry_run, "ok": self.ok(),
            "started_utc": self.started_utc,
            "seconds": round(time.monotonic() - self.start, 1), "budget_s": self.budget,
            "machine": self.info, "parts": [asdict(p) for p in self.parts], "tests": self.tests,
            "bench": self.bench, "files": sorted(p.name for p in self.out.iterdir() if p.is_file()),
        }
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        tmp.replace(self.out / "summary.json")

    def ok(self) -> bool:
        """Every test passed, and no part failed or overran its limit (a part left out for want of
        time, or an optional one not run, is said in the summary but fails nothing)."""
        tests = [p for p in self.parts if p.name == "tests"]
        return (bool(tests) and tests[0].status == "passed" and self.tests.get("ok", False)
                and all(p.status in ("passed", "not-run", "skipped") for p in self.parts))

    # --- running -------------------------------------------------------------------------------
    def run(self, name: str, cmd: list[str], stdout_to: Path | None = None, env: dict | None = None,
            limit: float | None = None, background: bool = False):
        """Run ``cmd`` in its own process group with a time limit; its output goes to the log (or
        stdout to ``stdout_to``). In the background: returns a function that waits and gives the Part."""
        limit = self.limit(name) if limit is None else limit
        part = Part(name, limit_s=round(limit, 1), command=[str(c) for c in cmd])
        if limit < 1:
            part.status, part.detail = "skipped", "out of time"
            return (lambda: self.add(part)) if background else self.add(part)
        shown = " ".join("<code>" if "\n" in a else a for a in part.command)
        self.say(f"{name}: {shown} (limit {limit:.0f}s)")
        log_file = self.scratch / f"{name}.log"
        out_file = open(stdout_to, "w") if stdout_to else open(log_file, "w")
        err_file = open(log_file, "a") if stdout_to else subprocess.STDOUT
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=out_file, stderr=err_file,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            out_file.close()
            part.status, part.detail = "failed", f"cannot start: {exc}"
            return (lambda: self.add(part)) if background else self.add(part)
        self.procs.append(proc)

        def finish() -> Part:
            rc = _wait(proc, t0 + limit)
            part.seconds = round(time.monotonic() - t0, 1)
            out_file.close()
            if err_file is not subprocess.STDOUT:
                err_file.close()
            self._append_log(name, log_file)
            if rc is None:
                part.status, part.detail = "timeout", f"killed after {limit:.0f}s"
            else:
                part.status = "passed" if rc == 0 else "failed"
                part.detail = "" if rc == 0 else f"exit status {rc}"
            part.extra["returncode"] = rc
            return self.add(part)

        return finish if background else finish()

    def _append_log(self, name: str, path: Path) -> None:
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            if len(data) > LOG_PART_LIMIT:
                data = data[: LOG_PART_LIMIT // 4] + b"\n[... cut ...]\n" + data[-3 * LOG_PART_LIMIT // 4 :]
            self.log.write(f"----- {name} output -----\n")
            self.log.write(data.decode(errors="replace"))
            self.log.write(f"----- end of {name} -----\n")
            self.log.flush()


def _wait(proc: subprocess.Popen, deadline: float) -> int | None:
    """The exit status, or None after interrupting (SIGINT: pytest still writes its report) and then
    killing the process group at ``deadline``."""
    try:
        return proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    except KeyboardInterrupt:  # the check itself is stopped (SIGINT, or SIGTERM below): stop the part too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    for sig, grace in ((signal.SIGINT, 8), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    return None


# --- the parts ---------------------------------------------------------------------------------

def check_gpu(c: Check) -> str | None:
    """The GPU as nvidia-smi names it; its architecture (``sm_XY``) or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        c.add(Part("gpu", "not-run" if c.dry_run else "failed", detail="nvidia-smi is not on PATH"))
        return None
    query = "name,driver_version,memory.total,compute_cap"
    c.run("gpu", [smi, f"--query-gpu={query}", "--format=csv,noheader"], stdout_to=c.scratch / "smi.txt")
    text = (c.scratch / "smi.txt").read_text() if (c.scratch / "smi.txt").exists() else ""
    gpus = [dict(zip(query.split(","), (x.strip() for x in line.split(",")))) for line in text.splitlines() if line]
    c.info["gpus"] = gpus
    if c.parts[-1].status != "passed" or not gpus:
        if c.dry_run:
            c.parts[-1].status, c.parts[-1].detail = "not-run", "dry run: no GPU expected"
        return None
    cap = gpus[0].get("compute_cap", "")
    return "sm_" + cap.replace(".", "") if cap.replace(".", "").isdigit() else None


def find_ptxas() -> str | None:
    """ptxas for ``gpuadam inspect``: on PATH, in an NVIDIA wheel, in a CUDA toolkit, or Triton's."""
    if shutil.which("ptxas"):
        return shutil.which("ptxas")
    patterns = ["/usr/local/cuda*/bin/ptxas", "/opt/cuda*/bin/ptxas"]
    for root in sys.path:
        patterns += [os.path.join(root, "nvidia", "*", "bin", "ptxas"),
                     os.path.join(root, "triton", "backends", "nvidia", "bin", "ptxas")]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if os.access(path, os.X_OK):
                return path
    return None


def versions(c: Check) -> None:
    code = ("import json, importlib.metadata as m\nout = {}\n"
            "for d in ('numpy', 'numba', 'numba-cuda', 'cupy-cuda13x', 'torch', 'jax', 'optax', 'pytest',"
            " 'hypothesis', 'ml_dtypes'):\n"
            "    try: out[d] = m.version(d)\n    except Exception: out[d] = None\nprint(json.dumps(out))")
    with contextlib.suppress(ValueError, OSError, subprocess.TimeoutExpired):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        c.info["versions"] = json.loads(proc.stdout)
    c.info.update(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count())
    for tool in ("ptxas", "compute-sanitizer"):
        path = find_ptxas() if tool == "ptxas" else _sanitizer()
        c.info[tool] = path
        if path:
            with contextlib.suppress(Exception):
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
                c.info[f"{tool}_version"] = out.strip().splitlines()[-1] if out.strip() else None


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/compute-sanitizer"))
    return candidates[-1] if candidates else None


def install(c: Check) -> None:
    if c.dry_run:
        c.add(Part("install", "not-run", detail="dry run: the package runs from PYTHONPATH"))
        return
    part = c.run("install", [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "-e", "."])
    if part.status != "passed":  # the parts run from PYTHONPATH anyway: this only records it
        part.status, part.detail = "passed", f"pip could not install it ({part.detail}): running from PYTHONPATH"
        c.write_summary()


def junit_counts(path: Path) -> dict:
    """Totals and the failing and skipped tests of a JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing, skips, slowest = [], {}, []
    for suite in suites:
        for case in suite.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            slowest.append((float(case.get("time", 0) or 0), name))
            for tag in ("failure", "error"):
                node = case.find(tag)
                if node is not None:
                    out["failures" if tag == "failure" else "errors"] += 1
                    failing.append(f"{name}: {(node.get('message') or '').strip()[:300]}")
            node = case.find("skipped")
            if node is not None:
                out["skipped"] += 1
                reason = (node.get("message") or "").strip()
                skips[reason] = skips.get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["failing"] = failing[:50]
    out["skip_reasons"] = skips
    out["slowest"] = [f"{t:.1f}s {n}" for t, n in sorted(slowest, reverse=True)[:10]]
    return out


def run_tests(c: Check, inspect_json: Path | None) -> None:
    xml = c.out / "tests.xml"
    env = dict(c.env)
    if c.dry_run:
        env.update(NUMBA_ENABLE_CUDASIM="1", GPUADAM_BACKEND="")
    else:
        env["GPUADAM_REQUIRE_ALL"] = "1"  # a skip for a missing package or tool fails the run
        env.pop("GPUADAM_BACKEND", None)
        if inspect_json is not None:
            env["GPUADAM_INSPECT_JSON"] = str(inspect_json)
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "--durations=10"]
    part = c.run("tests", cmd, env=env)
    if not xml.exists():
        c.tests = {"ok": False, "detail": "no JUnit XML: pytest did not get to write it"}
        c.write_summary()
        return
    counts = junit_counts(xml)
    gpu_only = all(r.startswith("GPU only") for r in counts["skip_reasons"])
    if c.dry_run:  # the simulator runs all it can; the rest skips, saying it is GPU only
        ok = counts["passed"] > 0 and not counts["failures"] and not counts["errors"] and gpu_only
    else:
        ok = counts["passed"] > 0 and not counts["failures"] and not counts["errors"] and not counts["skipped"]
    c.tests = {"ok": ok and part.status == "passed", **counts}
    if part.status == "passed" and not ok:  # pytest passed, but skipped what a GPU run must not skip
        part.status, part.detail = "failed", f"{counts['skipped']} skipped: " + "; ".join(counts["skip_reasons"])[:300]
    c.write_summary()


def bench_args(name: str, sizes: list[str], args: list[str], limit: float) -> list[str]:
    """``gpuadam bench`` arguments of bench part ``name`` given ``limit`` seconds: the largest of
    ``sizes`` whose share of the part's cap fits (each halving of the size about halves the work)."""
    if not sizes:
        return args + BENCH_COMMON
    fits = [s for i, s in enumerate(sizes) if CAPS[name] / 2**i <= limit + 1] or sizes[-1:]
    return args + BENCH_COMMON + ["--sizes", fits[0]]


#: The dry run's bench: the plumbing on the CPU, one tiny size, no peers, through the same merging.
DRY_BENCH = ["--backends", "numba-cpu", "--no-peers", "--no-overhead", "--repeat", "1", "--rounds", "1",
             "--min-time", "0.001", "--no-progress", "--sizes", "2^10"]


def run_benches(c: Check, benches: list, runs: dict) -> None:
    """Run ``benches``, adding each one's JSON to ``runs`` and all of them to ``bench.json``."""
    for name, args, sizes in benches:
        if c.dry_run:
            if name != BENCHES[0][0]:
                c.add(Part(name, "not-run", detail="dry run: GPU only"))
                continue
            args = DRY_BENCH
        else:
            args = bench_args(name, sizes, args, c.limit(name))
        path = c.scratch / f"{name}.json"
        part = c.run(name, [sys.executable, "-m", "gpuadam", "bench", *args, "--json", str(path)])
        part.extra["args"] = args
        if not c.dry_run and sizes and args[-1] != sizes[0]:
            part.detail = (part.detail + "; " if part.detail else "") + f"cut to {args[-1]} to fit the time"
        if path.exists():
            with contextlib.suppress(ValueError):
                runs[name] = json.loads(path.read_text())
                c.bench[name] = bench_figures(runs[name])
        (c.out / "bench.json").write_text(json.dumps({"schema": "gpuadam-gpu-check-bench/1", "runs": runs}))
        c.write_summary()


def bench_figures(doc: dict) -> list[dict]:
    """Per size and row of ours (each state layout's), of torch fused and of bitsandbytes: bandwidth,
    fraction of the same-bytes ceiling, and torch fused's time over ours."""
    rows = []
    for r in doc.get("results", []):
        peer = r["group"] == "peer" and ("fused" in r["implementation"] or "Adam8bit" in r["implementation"])
        if r["suite"] == "sizes" and (r["implementation"].endswith(".step") or peer or r["group"] == "ceiling"):
            rows.append({k: r.get(k) for k in ("implementation", "dtype", "master_weights", "state_dtype", "size",
                                               "status", "bandwidth_gbs", "ceiling_fraction", "median_s", "reason")})
    for ratio in doc.get("ratios", []):
        fused = {k: v for k, v in ratio.get("peer_time_over_ours", {}).items() if "fused" in k}
        rows.append({"ours": ratio["ours"], "size": ratio["size"], "ours_over_ceiling": ratio["ours_over_ceiling"],
                     "torch_fused_time_over_ours": fused})
    return rows


def sanitize(c: Check) -> None:
    if c.dry_run:  # the step itself, in the simulator, without the sanitizer
        env = {**c.env, "NUMBA_ENABLE_CUDASIM": "1", "GPUADAM_BACKEND": ""}
        part = c.run("sanitizer", [sys.executable, "-c", SANITIZED_STEP, "numba-cuda"], env=env)
        part.detail = (part.detail + "; " if part.detail else "") + "dry run: the step in the simulator, unsanitized"
        c.write_summary()
        return
    tool = _sanitizer()
    if tool is None:
        c.add(Part("sanitizer", "not-run", detail="compute-sanitizer is not on PATH"))  # optional
        return
    # API errors are left out: the backends' probes may meet some on purpose; memory errors count
    c.run("sanitizer", [tool, "--tool", "memcheck", "--error-exitcode", "3", "--report-api-errors", "no",
                        "--target-processes", "all", sys.executable, "-c", SANITIZED_STEP, "numba-cuda", "cupy"])


def print_summary(c: Check) -> None:
    print("\n=== gpu check summary ===")
    for p in c.parts:
        print(f"  {p.name:28s} {p.status:8s} {p.seconds:6.1f}s  {p.detail}")
    t = c.tests
    if "tests" in t:
        print(f"  tests: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for line in t.get("failing", [])[:20]:
            print(f"    FAILED {line}")
    for name, rows in c.bench.items():
        for r in rows:
            if "torch_fused_time_over_ours" in r:
                ceiling = r["ours_over_ceiling"]
                fused = ", ".join(f"{v:.2f}x" for v in r["torch_fused_time_over_ours"].values()) or "-"
                print(f"  {name}: {r['ours']} at {r['size']}: "
                      f"{'-' if ceiling is None else f'{ceiling:.0%}'} of the ceiling; torch fused time/ours {fused}")
    files = sorted(p.name for p in c.out.iterdir() if p.is_file())
    print(f"  files under {c.out}: {', '.join(files)}")
    print(f"  {'OK' if c.ok() else 'NOT OK'} in {time.monotonic() - c.start:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: the simulator part and the plumbing")
    parser.add_argument("--budget", type=float, default=345.0, help="seconds for everything (default 345)")
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or ROOT / "gpu-check-out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():  # a folder reused: only this run's files come back
        if stale.is_file() and stale.name in ("summary.json", "gpu_check.log", "tests.xml", "inspect.json",
                                              "bench.json"):
            stale.unlink()
    c = Check(out, args.budget, args.dry_run)

    def stopped(signum, frame):  # SIGTERM as SIGINT: the summary is still written and printed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
    c.say(f"gpu check{' (dry run)' if args.dry_run else ''}: {ROOT}, output in {out}, budget {args.budget:.0f}s")
    state: dict = {"arch": None, "wait_inspect": None}
    inspect_json = out / "inspect.json"

    def gpu() -> None:
        state["arch"] = check_gpu(c)

    def start_inspect() -> None:
        if c.info.get("ptxas"):  # gpuadam inspect and the register test look on PATH first
            c.env["PATH"] = os.pathsep.join([os.path.dirname(c.info["ptxas"]), c.env.get("PATH", "")])
        if args.dry_run:
            c.add(Part("inspect", "not-run", detail="dry run: tests/test_machine_code.py runs it in CI"))
            return
        # written aside and moved into place when complete: the register test, last of the tests,
        # reads it if it is there by then (else it compiles its predictions itself)
        state["wait_inspect"] = c.run("inspect", [sys.executable, "-c", INSPECT_TO, str(c.scratch / "inspect.part"),
                                                  str(inspect_json), state["arch"] or "sm_90"], background=True)

    def end_inspect() -> None:
        if state["wait_inspect"] is not None:
            state["wait_inspect"]()

    runs: dict = {}
    stages = [("machine", lambda: versions(c)), ("gpu", gpu), ("install", lambda: install(c)),
              ("inspect", start_inspect), ("tests", lambda: run_tests(c, inspect_json)), ("inspect", end_inspect),
              ("bench", lambda: run_benches(c, BENCHES[:BEFORE_SANITIZER], runs)), ("sanitizer", lambda: sanitize(c)),
              ("bench", lambda: run_benches(c, BENCHES[BEFORE_SANITIZER:], runs))]
    try:
        for name, stage in stages:
            try:
                stage()
            except Exception as exc:  # one stage's own error: said in the summary, and the next runs
                c.add(Part(f"{name} (gpu check)", "failed", detail=f"{type(exc).__name__}: {exc}"))
    except KeyboardInterrupt:
        c.add(Part("stopped", "failed", detail=f"interrupted during {name}"))
    finally:
        for proc in c.procs:  # a part left running in the background
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        c.write_summary()
        print_summary(c)
        c.log.close()
        shutil.rmtree(c.scratch, ignore_errors=True)
    files = [p for p in out.iterdir() if p.is_file()]
    if len(files) > MAX_FILES:
        print(f"gpu check: {len(files)} files under {out}, more than {MAX_FILES}", file=sys.stderr)
        return 1
    return 0 if c.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
