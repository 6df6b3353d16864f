"""The ``gpuadam`` command as a new user meets it: help, version, info, and every mistyped or
impossible input refused in one line (flag, what was given, what is accepted), exit status 2,
before any long work starts."""

from __future__ import annotations

import io
import re
from importlib import metadata

import pytest

import gpuadam
from gpuadam import backends, cli, demo, machine_code
from gpuadam.backends import BackendStatus
from gpuadam.bench import command as bench_command
from gpuadam.bench.progress import Progress


def _one_line_error(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith(prefix), err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


@pytest.fixture
def no_gpu(monkeypatch):
    """Both GPU backends unavailable, whatever this machine has."""
    statuses = {
        "numba-cuda": BackendStatus("numba-cuda", False, "no usable CUDA device (test)"),
        "cupy": BackendStatus("cupy", False, "no CUDA device found (test)"),
        "numba-cpu": backends.status("numba-cpu"),
    }
    monkeypatch.setattr(backends, "_statuses", statuses)


def _never(*args, **kwargs):
    raise AssertionError("the long work started although the input was refused")


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpuadam {gpuadam.__version__}"


@pytest.mark.parametrize("command", [[], ["info"], ["inspect"], ["bench"], ["demo"]])
def test_help_is_plain_text_with_a_description(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
    # a description paragraph between the usage and the options
    paragraphs = [p for p in out.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 3, out
    assert not paragraphs[1].lstrip().startswith(("options:", "positional arguments:")), out


def test_info_says_what_auto_picks(no_gpu, monkeypatch, capsys):
    monkeypatch.delenv("GPUADAM_BACKEND", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "(test)" in out
    assert out.splitlines()[-1].startswith("auto picks numba-cpu for NumPy arrays")
    assert "nothing here" in out.splitlines()[-1]


def test_info_refuses_an_unknown_backend_variable_as_the_optimizers_do(monkeypatch, capsys):
    monkeypatch.setenv("GPUADAM_BACKEND", "bogus")
    assert cli.main(["info"]) == 2
    err = _one_line_error(capsys, "gpuadam info: $GPUADAM_BACKEND: got 'bogus'; expected one of")
    assert "numba-cpu" in err
    with pytest.raises(ValueError, match="bogus"):
        import numpy as np

        gpuadam.Adam([np.zeros(2, np.float32)])


def test_info_names_the_forced_backend(monkeypatch, capsys):
    monkeypatch.setenv("GPUADAM_BACKEND", "numba-cpu")
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "$GPUADAM_BACKEND=numba-cpu: every optimizer without backend= uses numba-cpu")


@pytest.fixture
def fake_ptxas(monkeypatch):
    """A ptxas that knows three architectures, so --arch is checked without the toolchain."""
    monkeypatch.setattr(machine_code, "find_ptxas", lambda: "ptxas")
    monkeypatch.setattr(machine_code, "ptxas_architectures", lambda ptxas: ["sm_80", "sm_90", "sm_100"])
    monkeypatch.setattr(machine_code, "missing_requirements", lambda: None)
    monkeypatch.setattr(machine_code, "inspect_kernels", _never)


def test_inspect_says_what_per_element_means_for_a_kernel_without_a_loop(fake_ptxas, monkeypatch, capsys):
    note = machine_code.NOTES["adam/int8"]
    rows = [machine_code.KernelReport("cupy", name, "float32", "sm_90", 25, 0, 0, 0, 12, 5, 12, 5, note)
            for name in ("adam/int8", "adam/int8/device-constants")]
    monkeypatch.setattr(machine_code, "inspect_kernels", lambda *args: (rows, []))
    assert cli.main(["inspect"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"adam/int8: {note}" and sum(note in line for line in out) == 1


@pytest.mark.parametrize("arch", ["foo", "sm_999", "sm_", "90", "sm_90a"])
def test_inspect_refuses_an_unknown_arch_in_one_line(arch, fake_ptxas, capsys):
    assert cli.main(["inspect", "--arch", arch]) == 2
    _one_line_error(capsys, f"gpuadam inspect: --arch: got {arch!r}; expected one of sm_80, sm_90, sm_100")


def test_ptxas_architectures_are_read_from_its_help(monkeypatch):
    help_text = (
        "--gpu-name <gpu name>   (-arch)\n        Specify name of NVIDIA GPU.\n"
        "        Allowed values for this option:  'compute_90','sm_100','sm_100a','sm_75',\n"
        "        'sm_90','sm_90a'.\n        Default value:  'sm_75'.\n\n--help  (-h)\n   'sm_35'\n"
    )

    class Done:
        stdout = help_text

    monkeypatch.setattr(machine_code.subprocess, "run", lambda *a, **k: Done())
    assert machine_code.ptxas_architectures("ptxas") == ["sm_75", "sm_90", "sm_100"]


def test_inspect_without_numba_cuda_says_what_it_needs_in_one_line(monkeypatch, capsys):
    real = metadata.version

    def version(dist):
        if dist == "numba-cuda":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(backends.metadata, "version", version)
    monkeypatch.setattr(machine_code, "inspect_kernels", _never)
    assert cli.main(["inspect"]) == 2
    err = _one_line_error(capsys, "gpuadam inspect: needs numba-cuda (not installed)")
    assert "pip install 'gpuadam[inspect]'" in err


def test_inspect_refuses_an_unwritable_ptx_dir(fake_ptxas, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["inspect", "--ptx-dir", str(blocker / "sub")]) == 2
    _one_line_error(capsys, "gpuadam inspect: --ptx-dir: cannot create the folder")


def test_inspect_progress_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(cli.sys, "stderr", io.StringIO())
    assert cli._inspect_progress() is None

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(cli.sys, "stderr", term)
    show = cli._inspect_progress()
    show(3, 10, "numba-cuda adam float32")
    assert "3/10 numba-cuda adam float32" in term.getvalue()
    show(10, 10, "")
    assert term.getvalue().endswith("\r")  # the line is cleared: the report starts clean


def test_bench_refuses_an_unavailable_backend_before_running(no_gpu, monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "run", _never)
    assert cli.main(["bench", "--backends", "cupy", "--no-progress"]) == 2
    err = _one_line_error(capsys, "gpuadam bench: --backends: cupy cannot run here (no CUDA device found (test))")
    assert err.rstrip().endswith("expected some of numba-cpu")


@pytest.mark.parametrize("argv,prefix", [
    (["--optimizers", "adamx"], "gpuadam bench: --optimizers: got adamx; expected some of adam"),
    (["--backends", "triton"], "gpuadam bench: --backends: got triton; expected some of"),
    (["--repeat", "0"], "gpuadam bench: --repeat: got 0; expected an integer >= 1"),
    (["--min-time", "0"], "gpuadam bench: --min-time: got 0.0; expected seconds > 0"),
    (["--dtype", "float32", "--master-weights"], "gpuadam bench: --master-weights: got --dtype float32"),
])
def test_bench_refuses_bad_values_in_one_line(argv, prefix, monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "run", _never)
    assert cli.main(["bench", "--no-progress", *argv]) == 2
    _one_line_error(capsys, prefix)


def test_bench_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setattr(bench_command, "run", _never)
    assert cli.main(["bench", "--no-progress", "--plot", str(tmp_path / "x.png")]) == 2
    err = _one_line_error(capsys, "gpuadam bench: --plot needs matplotlib")
    assert "pip install 'gpuadam[demo]'" in err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_output_paths_are_checked_before_running(flag, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_command, "run", _never)
    assert cli.main(["bench", "--no-progress", flag, str(tmp_path / "missing" / "out")]) == 2
    _one_line_error(capsys, f"gpuadam bench: {flag}: the folder of")
    assert cli.main(["bench", "--no-progress", flag, str(tmp_path)]) == 2
    _one_line_error(capsys, f"gpuadam bench: {flag}: {str(tmp_path)!r} is a folder")


def test_demo_out_is_checked_before_training(monkeypatch, tmp_path, capsys):
    pytest.importorskip("sklearn", reason="sklearn is not installed (pip install 'gpuadam[demo]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'gpuadam[demo]')")
    pytest.importorskip("tqdm", reason="tqdm is not installed (pip install 'gpuadam[demo]')")
    monkeypatch.setattr(demo, "run", _never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "sub")]) == 2
    _one_line_error(capsys, "gpuadam demo: --out: cannot create the folder")
    assert cli.main(["demo", "--out", str(blocker)]) == 2
    _one_line_error(capsys, "gpuadam demo: --out: ")
    assert cli.main(["demo", "--steps", "0", "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "gpuadam demo: --steps: got 0; expected an integer >= 1")


def test_progress_writes_nothing_when_stderr_is_not_a_terminal():
    log = io.StringIO()
    bar = Progress(10, True, stream=log)
    bar.note("timing gpuadam numba-cpu Adam.step 2^24")
    bar.advance(3)
    bar.close()
    assert log.getvalue() == ""


def test_progress_label_names_what_runs_now():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    bar = Progress(10, True, stream=term)
    bar.note("timing gpuadam numba-cpu Adam.step 2^24 (1/7)")
    assert re.search(r"timing gpuadam numba-cpu Adam\.step 2\^24 \(1/7\)", term.getvalue())
    bar.close()


def test_inspect_kernels_picks_by_glob_and_refuses_a_pattern_that_matches_nothing(fake_ptxas, monkeypatch,
                                                                                  capsys):
    asked = []

    def inspect_kernels(arch, ptx_dir, progress, kernels):
        asked.append(kernels)
        return [], []  # what a pattern that matches no kernel gets

    monkeypatch.setattr(machine_code, "inspect_kernels", inspect_kernels)
    assert cli.main(["inspect", "--kernels", "nothing,*nope*"]) == 2
    assert asked == [["nothing", "*nope*"]]
    _one_line_error(capsys, "gpuadam inspect: --kernels: got 'nothing,*nope*', which matches no kernel")
    wanted = machine_code.kernel_matcher(["adam", "*int8*"])
    assert [k for k in ("adam", "adam/device-constants", "nadam/int8/master", "lion") if wanted(k)] == \
        ["adam", "nadam/int8/master"]
    assert machine_code.kernel_matcher(None)("anything")
