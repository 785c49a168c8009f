"""benchmarks/ncu_kernels.py reads ncu's CSV pages: the raw page's units row is not a launch, numbers keep their
thousands separators, and the hottest SASS lines come out ordered by their stall samples."""
from __future__ import annotations

import pytest

from benchmarks import ncu_kernels as nk

RAW = ('==PROF== a line that is not CSV\n'
       '"ID","Kernel Name","gpu__time_duration.sum","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",'
       '"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio"\n'
       '"","","nsecond","",""\n'
       '"0","_logits_ws_kernel","1,234,500","0.5","2.25"\n'
       '"1","_sparse_mla_prefill_kernel","2000","",""\n')

# the source page as ncu 2025 writes it: a kernel-name line before the header, "(Not Issued)" twins of the reasons
SOURCE = ('"Kernel Name","_logits_ws_kernel",\n'
          '"Address","Source","Warp Stall Sampling (All Samples)","stall_wait","stall_long_sb",'
          '"stall_long_sb (Not Issued)"\n'
          '"0x10","FFMA R1, R2, R3, R1","5","1","4","99"\n'
          '"0x20","QGMMA.64x256x32","40","0","0","0"\n'
          '"0x30","LDG.E R4, [R6]","12","2","10","99"\n')

DETAILS = ('"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
           '"0","k","GPU Speed Of Light Throughput","Duration","ns","3,067,936"\n'
           '"0","k","GPU Speed Of Light Throughput","SM Frequency","hz","1,802,732,602.64"\n'
           '"0","k","GPU Speed Of Light Throughput","DRAM Throughput","%","11.68"\n'
           '"1","k2","Occupancy","Achieved Occupancy","%","6.25"\n'
           '"1","k2","Launch Statistics","Function Cache Configuration","","CachePreferNone"\n')


def test_raw_rows_skip_the_units_row_and_parse_separated_numbers():
    rows = nk._rows(RAW)
    assert [r["ID"] for r in rows] == ["0", "1"]
    assert nk._num(rows[0]["gpu__time_duration.sum"]) == 1234500.0
    assert nk._num("") is None and nk._num("n/a") is None


def test_hot_sass_orders_lines_by_samples_with_their_largest_reasons():
    hot = nk._hot_sass(SOURCE, n=2)
    assert [h["samples"] for h in hot] == [40.0, 12.0]
    assert hot[0]["sass"].startswith("QGMMA") and hot[0]["reasons"] == {}
    assert list(hot[1]["reasons"]) == ["stall_long_sb", "stall_wait"]
    assert nk._hot_sass("") == []


def test_details_page_per_launch_in_ms_and_mhz():
    d = nk.details_by_launch(DETAILS)
    assert d[0] == {"Duration": pytest.approx(3.067936), "SM Frequency": pytest.approx(1802.7326),
                    "DRAM Throughput": 11.68}
    assert d[1] == {"Achieved Occupancy": 6.25}  # text values are left out


def test_profile_list_matches_the_target_launches():
    """The summary pairs the report's launches with KERNELS by order: every entry names a kernel of the regex."""
    kernels = [k for _, k in nk.KERNELS]
    assert len(kernels) == 5
    assert set(kernels) == {"_logits_ws_kernel", "_sparse_mla_prefill_kernel",
                            "_sparse_mla_prefill_fp8_gluon_kernel", "_topk1_kernel"}


def test_only_picks_kernels_by_words_and_names_a_miss():
    assert nk.selected([]) == nk.KERNELS
    assert [n for n, _ in nk.selected(["--only", "top-k,candidates"])] == ["indexer candidates H32 1M",
                                                                          "top-k prefill 2112 x 200K causal"]
    with pytest.raises(SystemExit, match="--only nope matches none of"):
        nk.selected(["--only", "nope"])


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    import benchmarks.require_gpu as rg

    monkeypatch.setattr(rg, "gpu_driver_present", lambda: False)
    monkeypatch.setattr(nk.sys, "argv", ["ncu_kernels"])
    assert nk.main() == 2
    assert "has none" in capsys.readouterr().out


def test_without_ncu_it_says_so(monkeypatch, capsys):
    import benchmarks.require_gpu as rg

    monkeypatch.setattr(rg, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(nk.shutil, "which", lambda name: None)
    monkeypatch.setattr(nk.os.path, "exists", lambda p: False)
    monkeypatch.setattr(nk.sys, "argv", ["ncu_kernels"])
    assert nk.main() == 2
    assert "no ncu" in capsys.readouterr().out


@pytest.mark.parametrize("kernel", ["_logits_ws_kernel", "_sparse_mla_prefill_kernel",
                                    "_sparse_mla_prefill_fp8_gluon_kernel", "_topk1_kernel"])
def test_profiled_kernel_names_exist(kernel):
    """A renamed kernel would silently drop out of ncu's -k filter."""
    from indexcache.kernels.indexer import gluon as ig
    from indexcache.kernels.sparse_mla import gluon as sg, triton as st
    from indexcache.kernels.topk import triton as tt

    assert any(hasattr(m, kernel) for m in (ig, sg, st, tt)), kernel
