"""bench.py end to end on tiny sizes: every row runs and reports its figures (not the speed)."""
import json

import bench
from conftest import run_here, run_script


def test_smoke_mode_writes_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script("bench.py", "--smoke", "--device", "cpu", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures) == set(bench.ROWS)
    for name, row in figures.items():
        for key in ("ours_s", "reference_s", "ratio", "goal"):
            assert isinstance(row[key], float) and row[key] > 0, (name, key, row[key])
        assert isinstance(row["met"], bool), name
        assert row["direction"] in (">=", "<="), name
        assert row["mode"] == "smoke" and row["size"] and row["precision"] in ("fp32", "bf16"), name
    for name in bench.ROWS:
        assert name in proc.stdout  # the table
    assert "precision: " in proc.stdout


def test_subset_and_unknown_rows():
    proc = run_here("bench.py", "--smoke", "--rows", "mask_speedup,nope")
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "known:" in proc.stderr and "Traceback" not in proc.stderr
