"""Every CUDA source in csrc/cuda/ compiles with nvcc for sm_80 (A100) and sm_90a (H100), and no kernel spills.

csrc/cuda/ includes no torch header, so nvcc alone compiles it, on a machine without a GPU. ptxas -v reports each
function's spill stores and loads; the kernels are memory bound and hold rows in registers, and a spill would turn
those registers into local-memory traffic, so every count must be 0. The objects of all the sources then link into
one shared library, as they do in lmrt._C: a non-template kernel or function defined in a shared header would be
defined twice. The sources are globbed: a .cu file added to csrc/cuda/ is covered without touching this test.
"""

import concurrent.futures
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ["sm_80", "sm_90a"]
# The flags torch.utils.cpp_extension adds to every .cu of an extension (COMMON_NVCC_FLAGS): code that leans on
# implicit half or bfloat16 conversions or operators compiles here but not in the extension build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "-Xcompiler",
    "-fPIC",
]
COMPILE_TIMEOUT_S = 900

# ptxas -v names each function, then reports its properties:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_80'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


class Compiled(NamedTuple):
    returncode: int
    output: str  # nvcc's stdout and stderr, ptxas's report included
    obj: Path


@pytest.fixture(scope="module")
def compile_source(nvcc, tmp_path_factory):
    """compile_source(source, arch) -> Compiled; each source is compiled once per module, for all ARCHS at once.

    One nvcc process per architecture, run side by side: each is single-threaded, and their separate ptxas reports
    stay apart (attention.cu takes 40 s per architecture on one core)."""
    build_dir = tmp_path_factory.mktemp("csrc_cuda")

    def compile_for(source: Path, arch: str) -> Compiled:
        obj = build_dir / f"{source.stem}.{arch}.o"
        # -gencode with the one real architecture: -arch=sm_90a would also run the front end for compute_90 PTX.
        virtual = arch.replace("sm_", "compute_")
        command = [nvcc, "-O3", "-std=c++17", f"-gencode=arch={virtual},code={arch}", "-Xptxas", "-v",
                   *TORCH_NVCC_FLAGS, f"-I{CUDA_DIR}", "-c", str(source), "-o", str(obj)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        return Compiled(result.returncode, result.stdout + result.stderr, obj)

    @functools.cache
    def compile_all_archs(source: Path) -> dict[str, Compiled]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
            return dict(zip(ARCHS, pool.map(functools.partial(compile_for, source), ARCHS), strict=True))

    return lambda source, arch: compile_all_archs(source)[arch]


def parse_ptxas_spills(output: str) -> tuple[set[str], dict[str, tuple[int, int]]]:
    """(entry functions compiled, {function: (spill store bytes, spill load bytes)}) from ptxas -v output."""
    entries, spills, current = set(), {}, None
    for line in output.splitlines():
        if match := _ENTRY.search(line):
            current = match.group(1)
            entries.add(current)
        elif match := _PROPERTIES.search(line):
            current = match.group(1)
        elif (match := _SPILLS.search(line)) and current is not None:
            spills[current] = (int(match.group(1)), int(match.group(2)))
    return entries, spills


def _demangled(names: list[str]) -> list[str]:
    """Readable names for the failure message; the mangled ones when c++filt is missing."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else names


def test_parse_ptxas_spills():
    output = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 128 bytes smem
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    entries, spills = parse_ptxas_spills(output)
    assert entries == {"_Z6kernelPf"}
    assert spills == {"_Z6kernelPf": (4, 12), "_Z6helperv": (0, 0)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=[source.name for source in SOURCES])
def test_compiles_without_register_spills(compile_source, source: Path, arch: str):
    compiled = compile_source(source, arch)
    assert compiled.returncode == 0, f"nvcc failed on {source.name} for {arch}:\n{compiled.output[-10000:]}"

    entries, spills = parse_ptxas_spills(compiled.output)
    unreported = sorted(entries - spills.keys())
    assert not unreported, (f"ptxas reported no spill counts for {unreported}; has its -v format changed?\n"
                            f"{compiled.output}")
    spilling = sorted(name for name, (stores, loads) in spills.items() if stores or loads)
    lines = [f"  {readable}: {spills[name][0]} bytes spill stores, {spills[name][1]} bytes spill loads"
             for name, readable in zip(spilling, _demangled(spilling), strict=True)]
    assert not spilling, f"register spills in {source.name} for {arch}:\n" + "\n".join(lines)


@pytest.mark.parametrize("arch", ARCHS)
def test_objects_link_into_one_library(nvcc, compile_source, arch: str, tmp_path: Path):
    if not SOURCES:
        pytest.skip("csrc/cuda/ has no .cu files")
    compiled = [compile_source(source, arch) for source in SOURCES]
    if any(c.returncode != 0 for c in compiled):
        pytest.skip("a source does not compile (test_compiles_without_register_spills says which)")
    result = subprocess.run([nvcc, "-shared", "-o", str(tmp_path / "libcuda_kernels.so"),
                             *(str(c.obj) for c in compiled)], capture_output=True, text=True)
    assert result.returncode == 0, f"the {arch} objects do not link together:\n{result.stdout + result.stderr}"
