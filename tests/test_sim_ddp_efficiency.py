"""benchmarks/sim_ddp_efficiency.py (issues 8 and 18) at a CI size: the figures docs/benchmarks.md quotes come from
the real samplers, and each policy's row says what the policy promises."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_simulation_reports_every_policy_from_the_real_samplers(capsys):
    spec = importlib.util.spec_from_file_location("sim_ddp_efficiency",
                                                  os.path.join(ROOT, "benchmarks", "sim_ddp_efficiency.py"))
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    sim.main(["--images", "20000", "--batch_size", "16", "--world_sizes", "32", "--modes", "short_side",
              "--epochs", "1", "--step_overhead", "0", "--json"])
    rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(rows) == {"round-robin", "mix", "drop", "split"}
    assert rows["drop"]["same_shape_share"] == rows["split"]["same_shape_share"] == 1.0
    assert rows["drop"]["efficiency"] == rows["split"]["efficiency"] == 1.0  # the pixel model: no step waits
    assert rows["round-robin"]["efficiency"] < rows["mix"]["efficiency"] < 1.0 and rows["mix"]["same_shape_share"] < 1
    assert rows["drop"]["images_per_epoch"] < rows["mix"]["images_per_epoch"] <= rows["split"]["images_per_epoch"]
    assert rows["split"]["batch_shapes"] > rows["mix"]["batch_shapes"]  # split's smaller batches: new shapes
    assert rows["mix"]["break_even_epochs"] == [0.0, 0.0] and rows["split"]["break_even_epochs"][0] > 0
