"""Machine facts: one reading of available memory (cgroup-aware) and one device choice, for every stage."""

from __future__ import annotations

from pathlib import Path

import pytest

import registry
from registry.errors import UsageError
from registry.machine import memory_available, pick_device
from registry.smoke import run_smoke

GIB = 1 << 30
MEMINFO = "MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   16777216 kB\n"  # 16 GiB


def fake_root(tmp_path: Path, meminfo: str | None = MEMINFO, **cgroup: str) -> Path:
    """A filesystem root with /proc/meminfo and the given /sys/fs/cgroup files."""
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    if meminfo is not None:
        (root / "proc" / "meminfo").write_text(meminfo)
    for name, text in cgroup.items():
        path = root / "sys" / "fs" / "cgroup" / name.replace("__", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        ({}, 16 * GIB),  # no cgroup files: MemAvailable
        ({"memory.max": "max\n", "memory.current": f"{GIB}\n"}, 16 * GIB),  # v2 without a limit
        ({"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"}, 3 * GIB),  # v2 limit under MemAvailable
        ({"memory.max": f"{64 * GIB}\n", "memory.current": f"{GIB}\n"}, 16 * GIB),  # v2 limit over it
        ({"memory__memory.limit_in_bytes": f"{2 * GIB}\n", "memory__memory.usage_in_bytes": f"{GIB // 2}\n"}, 3 * GIB // 2),  # v1
        ({"memory__memory.limit_in_bytes": "9223372036854771712\n", "memory__memory.usage_in_bytes": f"{GIB}\n"}, 16 * GIB),  # v1, no limit
        ({"memory.max": f"{GIB}\n", "memory.current": f"{2 * GIB}\n"}, 0),  # over its limit already
    ],
    ids=["meminfo", "v2-max", "v2-limit", "v2-high-limit", "v1-limit", "v1-unlimited", "v2-over"],
)
def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_room(tmp_path, cgroup, expected):
    assert memory_available("cpu", root=fake_root(tmp_path, **cgroup)) == expected


def test_available_memory_is_the_cgroup_room_without_meminfo_and_unknown_without_both(tmp_path):
    root = fake_root(tmp_path, meminfo=None, **{"memory.max": f"{4 * GIB}\n", "memory.current": f"{GIB}\n"})
    assert memory_available("cpu", root=root) == 3 * GIB
    assert memory_available("cpu", root=fake_root(tmp_path / "bare", meminfo=None)) is None


def test_one_module_reads_memory_and_chooses_the_device():
    # The rules live in machine.py; a second reader of these files, or a second device check, is a second copy.
    package = Path(registry.__file__).parent
    for marker in ("meminfo", "memory.max", "memory.limit_in_bytes", "mem_get_info", "use auto, cpu or cuda"):
        holders = sorted(str(p.relative_to(package)) for p in package.rglob("*.py") if marker in p.read_text())
        assert holders == ["machine.py"], (marker, holders)


def test_an_unknown_device_is_the_same_usage_error_for_every_stage(tmp_path):
    with pytest.raises(UsageError) as err:
        pick_device("gpu")
    assert str(err.value) == "unknown device 'gpu'; use auto, cpu or cuda"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # smoke had its own copy, which raised SmokeError (exit 1) where merge raised a usage error (exit 2).
    with pytest.raises(UsageError) as smoke_err:
        run_smoke(model, None, device="gpu", checks=[], write=False)
    assert (str(smoke_err.value), smoke_err.value.exit_code) == ("unknown device 'gpu'; use auto, cpu or cuda", 2)


def test_cuda_without_a_gpu_is_refused_with_one_message(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for run in (lambda: pick_device("cuda"), lambda: run_smoke(model, None, device="cuda", checks=[], write=False)):
        with pytest.raises(UsageError) as err:
            run()
        assert str(err.value) == "--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto"
