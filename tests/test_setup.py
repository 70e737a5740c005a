"""setup.py's choice of CUDA architectures (issue 15 item 7), without a CUDA build.

On a CPU build box with the CUDA toolkit and a CUDA build of torch, torch derives the
architectures from the visible GPUs when TORCH_CUDA_ARCH_LIST is unset, finds none and fails
with `IndexError: list index out of range`. setup.py then sets a default list. Here a CUDA torch
is emulated (torch.version.cuda, CUDA_HOME) and setup() is replaced by a recorder, so the test
checks what setup.py would build and that torch's arch-flag step no longer fails.
"""
import os
import runpy
from pathlib import Path

import pytest
import setuptools
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def run_setup(monkeypatch, *, gpus=0, cuda="13.0", cuda_home="/usr/local/cuda"):
    """Execute setup.py with setup() recorded; returns (namespace, setup keyword arguments)."""
    recorded = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: recorded.update(kw))
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.chdir(ROOT)
    namespace = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    return namespace, recorded


@pytest.fixture
def arch_env(monkeypatch):
    """TORCH_CUDA_ARCH_LIST unset, and restored (whatever setup.py writes) after the test."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    for name in ("RTMDET_NO_NATIVE", "RTMDET_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def sources(recorded):
    (ext,) = recorded["ext_modules"]
    return ext.sources


def test_default_arch_list_rules(arch_env):
    ns, _ = run_setup(arch_env)
    pick = ns["default_cuda_arch_list"]
    default = ns["DEFAULT_CUDA_ARCHS"]
    assert pick({}, 0) == default
    assert pick({"TORCH_CUDA_ARCH_LIST": ""}, 0) == default
    assert pick({"TORCH_CUDA_ARCH_LIST": " native "}, 0) == default  # native with no GPU fails too
    assert pick({"TORCH_CUDA_ARCH_LIST": "8.0"}, 0) is None          # the user's choice stays
    assert pick({}, 2) is None                                       # torch uses the visible GPUs
    assert pick({"TORCH_CUDA_ARCH_LIST": "native"}, 1) is None
    # The newest carries PTX for later GPUs (torch accepting every entry: the test below).
    archs = default.split(";")
    assert archs[-1].endswith("+PTX") and len(archs) >= 2


def test_no_gpu_build_box_gets_default_archs_and_torch_accepts_them(arch_env, capsys):
    # The bug: torch's own arch-flag step fails when nothing is set and no GPU is visible.
    arch_env.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(IndexError):
        cpp_extension._get_cuda_arch_flags()
    ns, recorded = run_setup(arch_env, gpus=0)
    out = capsys.readouterr().out
    default = ns["DEFAULT_CUDA_ARCHS"]
    assert any(s.endswith(".cu") for s in sources(recorded)), out
    assert f"building for {default}" in out
    flags = cpp_extension._get_cuda_arch_flags()  # no IndexError now
    for arch in default.replace("+PTX", "").split(";"):
        sm = arch.replace(".", "")
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags, flags
    newest = default.split(";")[-1].replace("+PTX", "").replace(".", "")
    assert f"-gencode=arch=compute_{newest},code=compute_{newest}" in flags  # the PTX


def test_user_choice_and_visible_gpus_are_left_alone(arch_env, capsys):
    arch_env.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    run_setup(arch_env, gpus=0)
    assert "building for" not in capsys.readouterr().out
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    arch_env.delenv("TORCH_CUDA_ARCH_LIST")
    run_setup(arch_env, gpus=1)
    assert "building for" not in capsys.readouterr().out
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


@pytest.mark.parametrize("why,env,cuda,home", [
    ("RTMDET_NO_CUDA set", {"RTMDET_NO_CUDA": "1"}, "13.0", "/usr/local/cuda"),
    ("torch has no CUDA", {}, None, None),
    ("nvcc not found", {}, "13.0", None),
])
def test_cpu_only_builds_say_why(arch_env, capsys, why, env, cuda, home):
    for k, v in env.items():
        arch_env.setenv(k, v)
    _, recorded = run_setup(arch_env, cuda=cuda, cuda_home=home)
    out = capsys.readouterr().out
    assert f"building C++ CPU ops only ({why})" in out
    assert not any(s.endswith(".cu") for s in sources(recorded))
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_no_native_builds_nothing(arch_env, capsys):
    arch_env.setenv("RTMDET_NO_NATIVE", "1")
    _, recorded = run_setup(arch_env)
    assert recorded["ext_modules"] == []
    assert "building no native ops" in capsys.readouterr().out
    assert "rtmdet.kernels" in recorded["packages"]
