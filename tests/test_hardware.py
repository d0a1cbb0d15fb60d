"""--dtype names -> precision, and the CPU's bfloat16 detection from its flags."""

import pytest
import torch

from ldm.hardware import Precision, cpu_flags, pick_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\nbugs\t\t: spectre\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_float32_on_cpu_whatever_the_cpu(native):
    assert pick_precision("auto", CPU, native_bf16=native) == Precision("float32")


def test_fast_is_bf16_channels_last_only_with_native_bf16():
    assert pick_precision("fast", CPU, native_bf16=True) == Precision("bfloat16", channels_last=True)
    assert pick_precision("fast", CPU, native_bf16=False) == Precision("float32")


@pytest.mark.parametrize("name", ["auto", "fast"])
def test_gpu_gets_float16(name):
    assert pick_precision(name, CUDA).dtype == torch.float16


def test_explicit_names_are_taken_as_they_are():
    for name in ("float32", "float16", "bfloat16"):
        precision = pick_precision(name, CPU, native_bf16=True)
        assert precision.dtype == getattr(torch, name) and precision.memory_format == torch.contiguous_format
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_precision("float64", CPU)
