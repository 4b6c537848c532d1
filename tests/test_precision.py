"""Precision and memory format from the CPU's capability table (faked both ways: the machine that
runs the tests may or may not compute bf16 natively), and the default --workers."""
import pytest
import torch
from torch import nn

from image_classification import cli, config, machine, precision, runtime, settings
from tests.helpers.registered import model_for_module
from image_classification.reporting.dllogger import read_raport


def _tiny(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, num_classes))


_precision_cnn = model_for_module("precision-cnn", _tiny, default_image_size=24)


TINY = ["--arch", "precision-cnn", "--data-backend", "synthetic", "--device", "cpu", "-b", "4", "--epochs", "1",
        "--prof", "2", "--training-only", "--no-checkpoints", "--workers", "0", "--synthetic-epoch-size", "8"]


@pytest.mark.parametrize("features, feature", [
    (("avx512_f", "avx512_bf16"), "avx512_bf16"),
    (("amx_bf16", "avx512_bf16"), "amx_bf16"),     # the best one present is named
    (("neon", "bf16"), "bf16"),                     # ARM64: NEON BF16
    (("sve", "sve_bf16"), "sve_bf16"),
])
def test_amp_is_bf16_where_the_cpu_has_native_bf16(cpu_features, features, feature):
    cpu_features(*features)
    chosen = precision.choose("cpu", amp=True)
    assert chosen.amp_dtype == torch.bfloat16 and chosen.warning is None
    assert chosen.note == f"--amp: bf16 autocast (this CPU has {feature})"


def test_amp_is_fp32_where_the_cpu_emulates_bf16(cpu_features):
    cpu_features("avx512_f", "avx512_bw", "avx512_vnni", "amx_bf16_disabled")
    chosen = precision.choose("cpu", amp=True)
    assert chosen.amp_dtype is None and chosen.warning is None
    assert chosen.note.startswith("--amp: fp32 (this CPU has no native bf16: no amx_bf16/avx512_bf16/sve_bf16/bf16")


def test_amp_dtype_bfloat16_forces_bf16_with_one_warning_only_where_emulated(cpu_features):
    cpu_features("avx2")
    forced = precision.choose("cpu", amp=True, requested="bfloat16")
    assert forced.amp_dtype == torch.bfloat16 and forced.note is None
    assert forced.warning.startswith("warning: --amp-dtype bfloat16 forces bf16 on this CPU, which has no native")
    cpu_features("avx512_bf16")
    assert precision.choose("cpu", amp=True, requested="bfloat16") == precision.Precision(torch.bfloat16)


def test_cuda_and_no_amp_do_not_read_the_cpu(cpu_features):
    cpu_features()
    assert precision.choose("cuda", amp=True).amp_dtype == torch.float16
    assert precision.choose("cuda", amp=True, requested="bfloat16").amp_dtype == torch.bfloat16
    assert precision.choose("cpu", amp=False) == precision.Precision(None)
    assert precision.choose("cpu", amp=True, requested="float16").amp_dtype == torch.float16


@pytest.mark.parametrize("features, dtype, train_format, infer_format", [
    (("avx512_bf16",), torch.bfloat16, torch.channels_last, torch.channels_last),
    (("avx512_f",), None, torch.channels_last, torch.channels_last),
])
def test_memory_format_auto_follows_the_table(cpu_features, features, dtype, train_format, infer_format):
    cpu_features(*features)
    built = {path: runtime.build_runtime(device=torch.device("cpu"), amp=True, amp_dtype=None, memory_format="auto",
                                         tf32=True, path=path) for path in ("train", "infer")}
    assert {rt.amp_dtype for rt in built.values()} == {dtype}
    assert (built["train"].memory_format, built["infer"].memory_format) == (train_format, infer_format)
    explicit = runtime.build_runtime(device=torch.device("cpu"), amp=True, amp_dtype=None, memory_format="nhwc",
                                     tf32=True)
    assert explicit.memory_format == torch.channels_last


@pytest.mark.parametrize("features, amp, logged, parameter", [
    (("avx512_bf16",), ["--amp"], "=> --amp: bf16 autocast (this CPU has avx512_bf16)", "AMP-bf16"),
    (("avx512_f",), ["--amp"], "=> --amp: fp32 (this CPU has no native bf16", "FP32"),
])
def test_main_logs_the_feature_that_decided(cpu_features, capsys, tmp_path, features, amp, logged, parameter):
    cpu_features(*features)
    assert cli.main([*TINY, *amp, "--workspace", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if "--amp:" in line][0].startswith(logged)
    assert sum("--amp:" in line for line in captured.out.splitlines()) == 1
    assert "warning" not in captured.err
    record = next(r["data"] for r in read_raport(tmp_path / "experiment_raport.json") if r.get("step") == "PARAMETER")
    assert record["precision"] == parameter
    assert record["memory_format"] == "auto" and record["memory_format_used"] == "nhwc"  # the default, on the CPU


def test_main_warns_once_when_bf16_is_forced_on_a_cpu_without_it(cpu_features, capsys, tmp_path):
    cpu_features("avx2")
    assert cli.main([*TINY, "--amp", "--amp-dtype", "bfloat16", "--workspace", str(tmp_path)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(err) == 1 and "forces bf16 on this CPU" in err[0]
    record = next(r["data"] for r in read_raport(tmp_path / "experiment_raport.json") if r.get("step") == "PARAMETER")
    assert record["precision"] == "AMP-bf16"


@pytest.mark.parametrize("flag, given, used", [([], "auto", "nhwc"), (["--memory-format", "auto"], "auto", "nhwc"),
                                               (["--memory-format", "nchw"], "nchw", "nchw")])
def test_main_records_the_memory_format_auto_chose(cpu_features, tmp_path, flag, given, used):
    cpu_features("avx512_bf16")
    assert cli.main([*TINY, "--amp", *flag, "--workspace", str(tmp_path)]) == 0
    record = next(r["data"] for r in read_raport(tmp_path / "experiment_raport.json") if r.get("step") == "PARAMETER")
    assert (record["memory_format"], record["memory_format_used"]) == (given, used)


@pytest.mark.parametrize("capability, amp_dtype, expected", [
    ((8, 0), torch.float16, torch.channels_last),     # tensor cores, AMP: NHWC, as the reference's AMP presets
    ((9, 0), torch.bfloat16, torch.channels_last),
    ((7, 0), torch.float16, torch.channels_last),     # Volta: the first tensor cores
    ((6, 1), torch.float16, torch.contiguous_format),  # Pascal: no tensor cores
    ((8, 0), None, torch.contiguous_format),           # fp32 / TF32: NCHW, as the reference's FP32/TF32 presets
])
def test_memory_format_auto_on_cuda_follows_the_gpus_tensor_cores(monkeypatch, capability, amp_dtype, expected):
    monkeypatch.setattr(precision, "cuda_capability", lambda device: capability)
    gpu = torch.device("cuda", 0)
    assert precision.memory_format("auto", gpu, "train", amp_dtype) == expected
    assert precision.memory_format("auto", gpu, "infer", amp_dtype) == expected
    assert precision.memory_format("nchw", gpu, "train", amp_dtype) == torch.contiguous_format  # explicit stays


# ---------------------------------------------------------------- --workers from the usable cores

def _workers(argv: list[str]) -> int:
    """--workers as the run resolves it (settings.resolve fills it in)."""
    return settings.resolve(config.parse_args(argv), default_image_size=224).flags.workers


def test_default_workers_follow_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert _workers(["--device", "cpu"]) == 2
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert _workers([]) == 5  # the reference's default where the cores allow
    assert _workers(["-j", "7"]) == 7 and _workers(["--workers", "0"]) == 0


@pytest.mark.parametrize("env, workers", [
    ({"LOCAL_WORLD_SIZE": "4"}, 4), ({"LOCAL_WORLD_SIZE": "8"}, 2), ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 4),
    ({"LOCAL_WORLD_SIZE": "32"}, 1), ({}, 5),
])
def test_default_workers_share_the_cores_among_the_nodes_processes(monkeypatch, env, workers):
    """16 cores and 4 processes per node: 4 workers each (before: 5 each, 20 on 16 cores)."""
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _workers([]) == workers


# ---------------------------------------------------------------- the machine line of every benchmark

def test_machine_line_names_cpu_cores_capabilities_and_versions(cpu_features, monkeypatch):
    import torch
    monkeypatch.setattr(machine.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(machine, "dali_version", lambda: "2.4.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_features("avx512_f", "avx512_vnni")
    line = machine.describe({**precision.cpu_capabilities(), "cpu_name": "Intel Xeon"})
    assert line == (f"machine: Intel Xeon (x86_64), 2 of 8 cores usable, bf16 emulated (no native bf16), AMX none, "
                    f"VNNI avx512_vnni, torch {torch.__version__}, DALI 2.4.0, GPU none")
    cpu_features("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16")
    assert ", bf16 native (amx_bf16), AMX amx_tile/amx_bf16/amx_int8, VNNI none," in machine.describe()


def _first_print_in_main(script) -> str | None:
    import ast
    tree = ast.parse(script.read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    prints = sorted((node for node in ast.walk(main) if isinstance(node, ast.Call)
                     and isinstance(node.func, ast.Name) and node.func.id == "print"),
                    key=lambda node: (node.lineno, node.col_offset))
    return ast.unparse(prints[0]) if prints else None


def test_every_benchmark_prints_the_machine_line_first(capsys):
    from pathlib import Path
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    for script in benchmarks.glob("*.py"):  # the first thing main() prints (a word in a comment would not do)
        assert _first_print_in_main(script) == "print(machine.describe(), flush=True)", script.name
    smoke = (benchmarks / "gpu_smoke.sh").read_text().splitlines()
    pytest_line = next(index for index, line in enumerate(smoke) if line.startswith("exec python -m pytest"))
    assert smoke[pytest_line - 1] == 'python -c "from image_classification.machine import describe; print(describe())"'
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_precision", benchmarks / "bench_precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--arch", "precision-cnn", "--tasks", "infer", "train", "--modes", "eager",
                       "--image-size", "24", "-b", "2", "--iterations", "1", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == machine.describe()
    rows = [line for line in lines if line.startswith("| precision-cnn |")]
    assert len(rows) == 8 and sum(line.endswith("| <- |") for line in rows) == 2  # --amp's pick per task


def test_onednn_isa_cap_below_bf16_counts_as_a_cpu_without_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI makes oneDNN emulate bf16 on any CPU (how one machine
    measures both kinds): --amp then picks fp32 and the machine line says why."""
    monkeypatch.setattr(precision.torch.cpu, "get_capabilities",
                        lambda: {"architecture": "x86_64", "avx512_bf16": True, "avx512_vnni": True})
    assert precision.native_bf16_feature(precision.cpu_capabilities({})) == "avx512_bf16"
    assert precision.native_bf16_feature(precision.cpu_capabilities({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    assert precision.native_bf16_feature() is None
    assert precision.choose("cpu", amp=True).note.startswith(
        "--amp: fp32 (this CPU has no native bf16: ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI;")
    assert "bf16 emulated (no native bf16, oneDNN capped at AVX512_CORE_VNNI)" in machine.describe()
