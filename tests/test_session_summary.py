"""benchmarks/session_summary.py: the GPU session's figures merged, the compile table, the headline ratios last."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("session_summary", os.path.join(ROOT, "benchmarks", "session_summary.py"))
session_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(session_summary)


def e2e(ips: float, workers: int, warmup_s: float, graphs: int, shapes: str = "per_shape") -> str:
    return json.dumps({"images_per_sec": ips, "data_wait_frac": 0.1, "warmup_s": warmup_s, "compile_graphs": graphs,
                       "train_shapes": ["256x256x192", "256x224x224", "256x192x256"], "timed_steps": 30,
                       "skip_steps": 10, "settings": {"rect_mode": "area", "workers": workers, "compiled": True,
                                                      "compile_shapes": shapes, "batch_size": 256, "max_ratio": 1.34}})


def test_the_summary_prints_the_compile_table_and_the_headline_ratios_last(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    (res / "e2e_area.json").write_text("the run's log line\n" + e2e(6600.0, 16, 120.0, 3))  # JSON: the last line
    (res / "e2e_area_w12.json").write_text(e2e(6000.0, 12, 15.0, 3))
    (res / "e2e_dynamic.json").write_text("{broken")  # a step killed mid-write: a note, not an error
    (res / "timm.json").write_text(json.dumps({"images_per_sec": 4400.0, "data_wait_frac": 0.06}))
    (res / "check.txt").write_text("[ ok ] python  3.12\n[ ok ] decoder  turbo (region decoding)\n")
    (res / "steps.tsv").write_text("e2e_area\t0\t130\ne2e_dynamic\t124\t200\n")
    assert session_summary.main([str(res), str(tmp_path / "summary.json")]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    table = "\n".join(out)
    assert "decoder  turbo (region decoding)" in table
    assert "e2e_area       per_shape  cold" in table and "e2e_area_w12   per_shape  warm" in table
    assert "scaled to the default 9 shapes: 45 s (meets the goal of under 60 s)" in table  # 15 s x 9 / 3
    assert out[-4].startswith("ours, area, compiled per_shape, 16 workers") and "1.50x timm" in out[-4]
    assert "1.10x the 6,000 images/s goal" in out[-4]
    assert out[-3].startswith("ours, area, compiled per_shape, 12 workers") and "1.36x timm" in out[-3]
    assert out[-2].startswith("ours, area, compiled dynamic") and "not measured (see steps)" in out[-2]
    assert out[-1].startswith("timm train.py") and "4,400 images/s" in out[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["headline"]["e2e_area"]["vs_timm"] == 1.5 and summary["compile"][0]["warmup_9_shapes_s"] == 360
