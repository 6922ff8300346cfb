"""cpu_identity: the CPU as measured decisions are keyed and benchmark figures are labelled, and the cache sizes
the OS reports (which size autotune's eviction)."""

from __future__ import annotations

import platform

from hcr_kernels import autotune
from hcr_kernels.cpu_identity import CPU0_CACHES, cache_bytes, cpu_identity, describe_cpu

ZEN3 = [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "512K"), (3, "Unified", "32768K")]
ZEN4 = [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32768K")]


def fake_caches(root, caches):
    """A sysfs cache folder: one index folder per (level, type, size) as cpu0/cache/index* holds them."""
    for index, (level, kind, size) in enumerate(caches):
        folder = root / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    return root


def fake_cpuinfo(path, family, model, stepping, name="AMD EPYC"):
    """/proc/cpuinfo with two processors; the second one differs, and must not be read."""
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: {}\nmodel\t\t: {}\nmodel name\t: {}\nstepping\t: {}\n"
    path.write_text(block.format(0, family, model, name, stepping) + "\n" + block.format(1, 99, 99, "Other", 9) + "\n")
    return path


def test_cache_sizes_per_level_without_the_instruction_cache(tmp_path):
    caches = fake_caches(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K"),
                                    (3, "Unified", "300M")])
    assert cache_bytes(caches) == {1: 48 << 10, 2: 2 << 20, 3: 300 << 20}
    assert cache_bytes(tmp_path / "absent") == {}


def test_an_unreadable_cache_entry_is_left_out(tmp_path):
    caches = fake_caches(tmp_path, [(1, "Data", "32K"), (2, "Unified", "lots")])
    (caches / "index2").mkdir()  # a folder without its files
    assert cache_bytes(caches) == {1: 32 << 10}


def test_two_cpus_that_share_a_name_are_told_apart(tmp_path):
    zen3 = describe_cpu(fake_cpuinfo(tmp_path / "zen3", 25, 1, 1), fake_caches(tmp_path / "zen3-caches", ZEN3))
    zen4 = describe_cpu(fake_cpuinfo(tmp_path / "zen4", 25, 17, 0), fake_caches(tmp_path / "zen4-caches", ZEN4))
    assert zen3 == "AMD EPYC (cpu family 25, model 1, stepping 1; L1 32 KiB, L2 512 KiB, L3 32 MiB)"
    assert zen4 == "AMD EPYC (cpu family 25, model 17, stepping 0; L1 32 KiB, L2 1 MiB, L3 32 MiB)"
    # the same numbers with another L2 (a VM's reported caches) still differ
    other_l2 = describe_cpu(tmp_path / "zen3", fake_caches(tmp_path / "other-caches", ZEN4))
    assert other_l2 != zen3


def test_without_cpuinfo_or_sysfs_the_processor_name_alone(tmp_path):
    assert describe_cpu(tmp_path / "no-cpuinfo", tmp_path / "no-caches") == (
        platform.processor() or platform.machine() or "unknown CPU")


def test_decisions_are_keyed_by_this_machines_identity():
    assert autotune.machine_key().startswith(cpu_identity() + " | isa ")
    if CPU0_CACHES.is_dir():  # Linux with sysfs, as CI's machines: the L2 is reported and named
        assert cache_bytes().get(2, 0) > 0 and " L2 " in cpu_identity()


def test_the_eviction_covers_twice_the_l2_the_os_reports(monkeypatch):
    """An L2 above the 1 MiB floor (an Intel Xeon's 2 MiB) gets twice its own size a core; before, Python's
    os.sysconf knew no SC_LEVEL2_CACHE_SIZE and every machine got the floor."""
    monkeypatch.setattr(autotune, "cache_bytes", lambda: {1: 48 << 10, 2: 2 << 20, 3: 300 << 20})
    assert autotune.core_caches_bytes(threads=2) == 2 * 2 * (2 << 20)
    monkeypatch.setattr(autotune, "cache_bytes", dict)  # the OS says nothing: the floor
    assert autotune.core_caches_bytes(threads=3) == 3 * 2 * (1 << 20)
