"""benchmarks/e2e.py's bookkeeping on the CPU: speedups are taken against the full-DSA row of the same context,
and no plot is drawn without one (it would be an empty chart)."""
from benchmarks.e2e import _plot, _speedups, scale_factors, sub_pattern


def test_speedups_against_the_full_row_of_the_same_context():
    rows = [{"context": 10, "pattern": "full", "est_ttft_s": 4.0, "est_decode_tok_s": 100.0},
            {"context": 10, "pattern": "1/4", "est_ttft_s": 2.0, "est_decode_tok_s": 150.0},
            {"context": 20, "pattern": "1/4", "est_ttft_s": 5.0, "est_decode_tok_s": 140.0}]
    _speedups(rows)
    assert rows[1]["speedup_prefill"] == 2.0 and rows[1]["speedup_decode"] == 1.5
    assert "speedup_prefill" not in rows[2]  # no full row at context 20


def test_no_plot_without_a_full_row(tmp_path):
    rows = [{"context": 10, "pattern": "1/4", "est_ttft_s": 2.0}, {"context": 10, "pattern": "FFRR", "est_ttft_s": 3.0}]
    _speedups(rows)
    got = _plot(rows, "e2e_x", str(tmp_path))
    assert isinstance(got, str) and got.startswith("skipped: no full-DSA row")
    assert not list(tmp_path.iterdir())


def test_sub_pattern_keeps_the_pool_of_a_cut_pattern():
    assert sub_pattern("FFRRRFRR@4096", 4) == "FFRR@4096"
    assert sub_pattern("FFRRRFRR", 4) == "FFRR"
    assert sub_pattern("1/4@4096", 4) == "1/4@4096"
    # indexer and top-k time scale with the layers that run an indexer (F and R), whatever the pool
    assert scale_factors("FFSSFFSS@4096", 4, 8)["indexer"] == 2.0
