"""The report: machine, configuration, accounting, every row and the ratios, as JSON, a table and
a plot."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

from gpuadam import backends
from gpuadam.bench.config import Config
from gpuadam.bench.problems import (
    CPU,
    LEAN_STATE,
    OPTIMIZERS,
    SCHEMA,
    TINY,
    VERIFY_SAMPLE,
    VERIFY_STEPS,
    VERIFY_STORAGE_ULPS,
    VERIFY_ULPS,
    lean_accounting,
    numpy_dtype,
    size_label,
)
from gpuadam.bench.timing import Entry


def _ceiling_for(entry: Entry, entries: list[Entry]) -> Entry | None:
    """The ceiling this entry is compared with (of its state layout): its own backend's, else the
    best on its device."""
    ceilings = [c for c in entries if c.impl.group == "ceiling" and c.status == "ok"
                and c.impl.device == entry.impl.device and c.problem.spec is entry.problem.spec
                and c.problem.n == entry.problem.n and c.impl.state_dtype == entry.impl.state_dtype]
    same = [c for c in ceilings if c.impl.backend == entry.impl.backend]
    if same:
        return same[0]
    return min(ceilings, key=lambda c: c.median(), default=None)


def _row(e: Entry, entries: list[Entry]) -> dict:
    row = {
        "suite": e.suite, "optimizer": e.problem.spec.name, "dtype": str(e.problem.dtype),
        "master_weights": e.problem.master, "state_dtype": e.impl.state_dtype,
        "size": e.problem.n, "tensors": len(e.problem.sizes), "layout": e.layout,
        "implementation": e.impl.name, "group": e.impl.group, "backend": e.impl.backend, "device": e.impl.device,
        "launches": e.impl.launches, "status": e.status, "reason": e.reason, "note": e.impl.note_for(e.problem) or None,
        "verified": e.verified, "verify_error": e.verify_error, "verify_tolerance_eps": e.impl.tolerance_eps,
        "verify_storage_ulps": e.impl.storage_ulps if e.problem.half else None,
        "timer": e.timer, "event_timing": e.event_timing,
        "buffer_sets": e.sets, "steps_per_sample": e.steps_per_sample, "samples_s": e.samples,
        "bytes_per_step": e.impl.bytes_per_step(e.problem),
        "median_s": None, "min_s": None, "max_s": None, "bandwidth_gbs": None, "bandwidth_gbs_best": None,
        "ceiling_fraction": None, "round_medians_s": e.round_medians, "spread": None,
        "allocated_first_in_rounds": e.first_in_round,
    }
    if e.samples:
        med, lo, hi = e.median(), min(e.samples), max(e.samples)
        moved = row["bytes_per_step"]
        row.update(median_s=med, min_s=lo, max_s=hi, bandwidth_gbs=moved / med / 1e9,
                   bandwidth_gbs_best=moved / lo / 1e9)
        if len(e.round_medians) > 1:
            row["spread"] = max(e.round_medians) / min(e.round_medians) - 1
        ceiling = _ceiling_for(e, entries) if e.suite != "overhead" else None
        if ceiling is not None:
            row["ceiling_fraction"] = ceiling.median() / med
    return row


def _ratios(rows: list[dict]) -> list[dict]:
    """Per (suite, optimizer, size): ours (each state layout's Adam.step) against its ceiling and against
    every peer (median times)."""
    out = []
    keys = sorted({(r["suite"], r["optimizer"], r["size"], r["device"]) for r in rows if r["suite"] == "sizes"})
    for suite, opt, size, device in keys:
        same = [r for r in rows if (r["suite"], r["optimizer"], r["size"], r["device"]) == (suite, opt, size, device)
                and r["median_s"]]
        ours = [r for r in same if r["group"] == "ours" and r["implementation"].endswith(".step")]
        for o in ours:
            peers = [r for r in same if r["group"] == "peer"]
            entry = {"optimizer": opt, "size": size, "device": device, "ours": o["implementation"],
                     "state_dtype": o["state_dtype"],
                     "ours_over_ceiling": o["ceiling_fraction"],
                     "peer_time_over_ours": {r["implementation"]: r["median_s"] / o["median_s"] for r in peers},
                     # the same ratio within each round (same allocations' fate), when there are several
                     "peer_time_over_ours_rounds": {
                         r["implementation"]: [a / b for a, b in zip(r["round_medians_s"], o["round_medians_s"])]
                         for r in peers if len(r["round_medians_s"]) == len(o["round_medians_s"]) > 1}}
            out.append(entry)
    return out


def machine_info() -> dict:
    """CPU, cores, threads, GPU and library versions, read without importing anything heavy."""
    from importlib import metadata

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_model"] = model
    if hasattr(os, "getloadavg"):  # anything else running skews a 2-core measurement: say so
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    info["cpu_count"] = os.cpu_count()
    info["cpus_usable"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    caches = {}
    for index in sorted(os.listdir("/sys/devices/system/cpu/cpu0/cache")) if os.path.isdir(
            "/sys/devices/system/cpu/cpu0/cache") else []:
        base = f"/sys/devices/system/cpu/cpu0/cache/{index}"
        try:
            level = open(f"{base}/level").read().strip()
            kind = open(f"{base}/type").read().strip()
            size = open(f"{base}/size").read().strip()
            shared = open(f"{base}/shared_cpu_list").read().strip()
        except OSError:
            continue
        caches[f"L{level} {kind}"] = f"{size} (shared by CPUs {shared})"
    info["caches"] = caches
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    import numba

    info["numba_threads"] = numba.get_num_threads()
    try:
        info["numba_threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        info["numba_threading_layer"] = None
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    info["env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                                    "NUMBA_ENABLE_CUDASIM", "GPUADAM_BACKEND")}
    gpus = []
    for name, st in backends.available_backends().items():
        if name != "numba-cpu":
            gpus.append({"backend": name, "available": st.available, "detail": st.reason})
    info["gpu"] = gpus
    versions = {}
    for dist in ("gpuadam", "numpy", "numba", "llvmlite", "numba-cuda", "cupy-cuda13x", "cupy-cuda12x", "torch",
                 "jax", "jaxlib", "optax", "deepspeed"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def report(config: Config, entries: list[Entry], skipped: dict[str, str], seconds: float) -> dict:
    """The JSON document: machine, configuration, accounting, every row, and the ratios."""
    dtype = numpy_dtype(config.dtype)
    rows = [_row(e, entries) for e in entries]
    return {
        "schema": SCHEMA,
        "machine": machine_info(),
        "config": {
            "sizes": list(config.sizes) if config.sweep else [], "many": config.many, "overhead": config.overhead,
            "backends": sorted({e.impl.backend for e in entries if e.impl.group == "ours"}),
            "backends_unavailable": skipped, "optimizers": list(config.optimizers), "dtype": config.dtype,
            "master_weights": config.master_weights, "state_dtypes": list(config.state_dtypes),
            "peers": config.peers, "repeat": config.repeat, "rounds": config.rounds, "min_time_s": config.min_time,
            "max_buffer_sets": config.max_sets, "quick": config.quick, "seed": config.seed,
            "many_tensors": config.many_count if config.many else 0, "many_range": list(config.many_range),
            "overhead_elements": TINY, "verify": {
                "steps": VERIFY_STEPS, "sampled_elements": VERIFY_SAMPLE, "tolerance_eps": VERIFY_ULPS,
                "storage_ulps": VERIFY_STORAGE_ULPS,
                "definition": "each step from the implementation's own previous values, against "
                              "gpuadam.reference.adam_reference in float64: |x - ref| <= tolerance_eps * "
                              "eps(compute dtype) * (max|ref| + max|ref - x_before|) [+ storage_ulps * "
                              "ulp(ref) per element for half storage], for p, m, v (vmax, master); lean "
                              "state: the reference steps from the dequantised moments, p at that budget, int8 "
                              "moments within one code of the reference's nearest-code quantisation and each "
                              "block's absmax at that budget, bfloat16 moments within one bfloat16 ulp "
                              "(gpuadam.bench.lean_state)",
            },
            "timing": {
                "cpu": "perf_counter around a sample of back-to-back steps, implementations interleaved "
                       "round-robin, median/min/max over the samples of every round; each round allocates "
                       "fresh buffers in a rotated order (another implementation first), and spread is "
                       "max/min - 1 of the rounds' medians",
                "gpu": "CUDA events around the launches after warm-up, buffer sets rotated when the working "
                       "set fits twice in the L2 cache",
                "overhead": f"host perf_counter per step on a {TINY}-element tensor (GPU: synchronised once "
                            "per sample)",
            },
        },
        "accounting": {name: OPTIMIZERS[name].accounting(dtype, config.master_weights)
                       for name in config.optimizers},
        "state_layouts": {kind: lean_accounting(kind) for kind in config.state_dtypes if kind in LEAN_STATE},
        "results": rows,
        "ratios": _ratios(rows),
        "seconds": round(seconds, 2),
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}" if x < 1 else f"{x * 1e3:.0f}"


def _seconds(s: float) -> str:
    """A duration as a person reads it: no "0 s" for a short run."""
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _storage(doc: dict) -> str:
    config = doc["config"]
    return f"{config['dtype']} + float32 master weights" if config.get("master_weights") else config["dtype"]


def format_table(doc: dict) -> str:
    """The human-readable report: machine, accounting, per-size tables, many-tensors, overhead, ratios."""
    m = doc["machine"]
    lines = [
        f"gpuadam bench  {m['cpu_model']}, {m['cpus_usable']} CPUs, numba {m['numba_threads']} threads "
        f"({m.get('numba_threading_layer') or '-'}), OMP_WAIT_POLICY={m['env'].get('OMP_WAIT_POLICY')}",
    ]
    gpus = [g["detail"] for g in m["gpu"] if g["available"]]
    lines.append(f"GPU: {'; '.join(gpus) if gpus else 'none'}")
    others = m.get("other_processes_cpus")
    if others is not None and others > 0.05:
        lines.append(f"WARNING: other processes kept {others:.2f} CPUs busy during the run: the figures are skewed")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    for name, acc in doc["accounting"].items():
        lines.append(f"{name} ({_storage(doc)}): {acc['definition']}")
    for b, why in doc["config"]["backends_unavailable"].items():
        lines.append(f"backend {b}: unavailable ({why})")
    rows = doc["results"]
    head = f"{'size':>10s}  {'implementation':42s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} " \
           f"{'GB/s':>7s} {'ceiling':>8s} {'spread':>7s}"

    def line(r: dict, label: str, width: int = 10) -> str:
        if r["status"] != "ok":
            return f"{label:>{width}s}  {r['implementation']:42s} {r['status'].upper()}: {r['reason']}"
        frac = "-" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.0f}%"
        spread = "-" if r.get("spread") is None else f"{100 * r['spread']:.0f}%"
        return (f"{label:>{width}s}  {r['implementation']:42s} {_ms(r['median_s']):>10s} {_ms(r['min_s']):>9s} "
                f"{_ms(r['max_s']):>9s} {r['bandwidth_gbs']:7.1f} {frac:>8s} {spread:>7s}")

    sweep = [r for r in rows if r["suite"] == "sizes" and not r.get("state_dtype")]
    for opt in dict.fromkeys(r["optimizer"] for r in sweep):
        lines += ["", f"== {opt}, {_storage(doc)}: time per step, bandwidth at "
                      f"{doc['accounting'][opt]['bytes_per_element']} B/element, fraction of the ceiling", head]
        for r in (r for r in sweep if r["optimizer"] == opt):
            lines.append(line(r, size_label(r["size"])))
    lines += _lean_table(doc)
    many = [r for r in rows if r["suite"] == "many"]
    if many:
        width = max(len(r["layout"]) for r in many)
        lines += ["", f"== many tensors: {doc['config']['many_tensors']} tensors of "
                      f"{doc['config']['many_range'][0]}-{doc['config']['many_range'][1]} elements "
                      f"({many[-1]['size']} in all) vs one tensor of the same size",
                  f"{'layout':>{width}s}" + head[10:]]
        for r in many:
            lines.append(line(r, r["layout"], width))
        ones = {(r["optimizer"], r["backend"]): r for r in many
                if r["layout"] == "one tensor" and r["group"] == "ours" and r["median_s"]}
        for r in many:
            base = ones.get((r["optimizer"], r["backend"])) or next(iter(ones.values()), None)
            if r["median_s"] and base and r is not base and r["group"] != "ceiling":
                lines.append(f"{'':10s}  {r['implementation']} ({r['layout']}): "
                             f"{r['median_s'] / base['median_s']:.2f}x the time of one tensor ({base['backend']})")
    over = [r for r in rows if r["suite"] == "overhead"]
    if over:
        lines += ["", f"== per-step host overhead: a {doc['config']['overhead_elements']}-element tensor",
                  f"{'':10s}  {'path':42s} {'median us':>10s} {'min us':>9s} {'max us':>9s}"]
        for r in over:
            if r["status"] != "ok":
                lines.append(f"{'':10s}  {r['implementation']:42s} {r['status'].upper()}: {r['reason']}")
            else:
                lines.append(f"{'':10s}  {r['implementation']:42s} {r['median_s'] * 1e6:10.1f} "
                             f"{r['min_s'] * 1e6:9.1f} {r['max_s'] * 1e6:9.1f}")
    if any(q["ours_over_ceiling"] is not None or q["peer_time_over_ours"] for q in doc["ratios"]):
        lines += ["", "== ratios (median times, same run): ours/ceiling bandwidth; peer time / our time "
                      "(> 1: we are faster)"]
        for q in doc["ratios"]:
            frac = "-" if q["ours_over_ceiling"] is None else f"{100 * q['ours_over_ceiling']:.0f}%"
            rounds = q.get("peer_time_over_ours_rounds", {})
            peers = "".join(f"; {k} {v:.2f}x" + (f" (rounds {'/'.join(f'{x:.2f}' for x in rounds[k])})"
                                                   if k in rounds else "")
                            for k, v in q["peer_time_over_ours"].items())
            lines.append(f"{q['optimizer']} {size_label(q['size']):>6s} {q['ours']}: {frac} of ceiling{peers}")
    notes = {r["implementation"]: r["note"] for r in rows if r["note"] and r["status"] == "ok"}
    lines += [""] + [f"note: {k}: {v}" for k, v in notes.items()]
    lines.append(f"({_seconds(doc['seconds'])}; every timed implementation was first checked against the "
                 "float64 reference)")
    return "\n".join(lines)


def _lean_table(doc: dict) -> list[str]:
    """Per optimizer and size with lean state: torch fused (float32 state, the reference) and each
    layout's rows, at that layout's bytes, with the fraction of the layout's ceiling and torch fused's
    time over the row's."""
    layouts = doc.get("state_layouts") or {}
    rows = [r for r in doc["results"] if r["suite"] == "sizes"]
    lean = [r for r in rows if r.get("state_dtype")]
    if not lean:
        return []
    def fused(r: dict) -> bool:
        return r["implementation"].startswith("torch fused")

    def shown(r: dict) -> bool:  # the reference, our float32 step, and every lean row
        ours = r["group"] == "ours" and r["implementation"].endswith(".step")
        return bool(r.get("state_dtype")) or fused(r) or ours

    width = max(len(r["implementation"]) for r in rows if shown(r))
    lines = ["", "== lean optimizer state (--state-dtype), float32 params: bandwidth at each layout's bytes "
                 "(" + "; ".join(f"{k} {v['bytes_per_element']:g} B/element" for k, v in layouts.items()) +
             "), fraction of that layout's ceiling, torch fused (float32 state) time / this time (> 1: faster)",
             f"{'size':>10s}  {'implementation':{width}s} {'state':>8s} {'median ms':>10s} {'min ms':>9s} "
             f"{'GB/s':>7s} {'ceiling':>8s} {'vs torch fused':>14s}"]
    for opt in dict.fromkeys(r["optimizer"] for r in lean):
        lines.append(f"-- {opt}")
        for size in dict.fromkeys(r["size"] for r in lean if r["optimizer"] == opt):
            here = [r for r in rows if r["optimizer"] == opt and r["size"] == size]
            for r in sorted((r for r in here if shown(r)), key=lambda r: (not fused(r), bool(r.get("state_dtype")))):
                label, state = size_label(size), r.get("state_dtype") or "float32"
                if r["status"] != "ok":
                    lines.append(f"{label:>10s}  {r['implementation']:{width}s} {state:>8s} {r['status'].upper()}: "
                                 f"{r['reason']}")
                    continue
                ref = next((f for f in here if f["status"] == "ok" and f["device"] == r["device"] and fused(f)), None)
                frac = "-" if r["ceiling_fraction"] is None else f"{100 * r['ceiling_fraction']:.0f}%"
                vs = "-" if ref is None else f"{ref['median_s'] / r['median_s']:.2f}x"
                lines.append(f"{label:>10s}  {r['implementation']:{width}s} {state:>8s} {_ms(r['median_s']):>10s} "
                             f"{_ms(r['min_s']):>9s} {r['bandwidth_gbs']:7.1f} {frac:>8s} {vs:>14s}")
    return lines


def plot(doc: dict, path: str) -> None:
    """Bandwidth against size, a line per implementation, the ceiling as a bold dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if r["suite"] == "sizes" and r["median_s"] and not r.get("state_dtype")]
    panels = list(dict.fromkeys((r["optimizer"], r["device"]) for r in rows)) or [("adam", CPU)]
    fig, axes = plt.subplots(1, len(panels), figsize=(10 * len(panels), 5), squeeze=False)
    for ax, (opt, device) in zip(axes[0], panels):
        mine = [r for r in rows if (r["optimizer"], r["device"]) == (opt, device)]
        for name in dict.fromkeys(r["implementation"] for r in mine):
            pts = sorted((r["size"], r["bandwidth_gbs"]) for r in mine if r["implementation"] == name)
            xs, ys = zip(*pts)
            if name.startswith("ceiling"):
                ax.plot(xs, ys, "k--", lw=2.5, label=name)
            else:
                ax.plot(xs, ys, "o-", lw=1.5, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor")
        ax.set_ylabel(f"GB/s at {doc['accounting'][opt]['bytes_per_element']} B/element")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{opt} {_storage(doc)} on {device}: bytes the step must move / median time")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    m = doc["machine"]
    fig.suptitle(f"gpuadam bench: {m['cpu_model']}, {m['cpus_usable']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)
        f.write("\n")
