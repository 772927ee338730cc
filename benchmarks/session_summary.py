"""Merge one GPU session's results into summary.json and print the tables, then the headline ratios last.

    python benchmarks/session_summary.py RESULTS_DIR OUT/summary.json

RESULTS_DIR holds what benchmarks/gpu_session.sh wrote: ``steps.tsv`` (step, exit status, seconds),
``tests.txt`` (the GPU-only tests' summary line), ``check.txt`` (`rectrain check`'s lines), and the JSON of each
benchmark: ``e2e_area.json`` (compiled, one graph per shape, cold cache, all workers), ``e2e_area_w12.json`` (the
same cache warm, 12 workers), ``e2e_dynamic.json`` (one graph for every shape, cold cache), ``e2e_short_side.json``,
``timm.json``, ``model.json``, ``ablation.json`` or, when the ablation ran out of time, its finished rows in
``ablation_rows.jsonl``. A missing or broken file becomes a note, never an error: the summary must come back whatever
else failed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectrain.commands.bench import ablation, model  # noqa: E402

GOAL_IMAGES_PER_SEC = 6000  # issues 8 and 16: end to end from JPEG files on one H200 at 224x224 (area mode)
GOAL_VS_TIMM = 1.5
GOAL_WARM_WARMUP_S = 60     # issue 16: the compiled step's warm-up from a warm cache, every bucket shape
DEFAULT_AREA_SHAPES = 9     # area buckets at 224 px with the default --max_ratio 2

# Our end-to-end runs: (results file, label), in the order they are printed.
E2E_RUNS = (("e2e_area", "area, compiled, cold cache"), ("e2e_area_w12", "area, compiled, warm cache"),
            ("e2e_dynamic", "area, compiled dynamic"), ("e2e_short_side", "short_side"))


def load_json(path: str):
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def load_rows(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def load_steps(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [dict(zip(("step", "exit", "seconds"), line.rstrip("\n").split("\t"))) for line in f if line.strip()]
    except OSError:
        return []


def measured(res) -> bool:
    return isinstance(res, dict) and "skipped" not in res and res.get("images_per_sec")


def e2e_label(name: str, res) -> str:
    """'area, compiled per_shape, 16 workers' (from the run's settings), or the run's name when it has no figure."""
    if not measured(res):
        return dict(E2E_RUNS)[name]
    s = res["settings"]
    compiled = f"compiled {s.get('compile_shapes')}" if s.get("compiled") else "eager"
    return f"{s['rect_mode']}, {compiled}, {s['workers']} worker{'s' if s['workers'] != 1 else ''}"


def headline(ours: dict, timm) -> tuple[dict, list[str]]:
    """The ratios of the issue's goals and their lines (printed last)."""
    head, lines = {}, []
    t = timm.get("images_per_sec") if measured(timm) else None
    for name, res in ours.items():
        label = e2e_label(name, res)
        if not measured(res):
            if res is not None or name != "e2e_short_side":  # (short_side is an extra)
                lines.append(f"ours, {label:<32}  not measured" + (f" ({res['skipped']})" if isinstance(res, dict)
                                                                    and res.get("skipped") else " (see steps)"))
            continue
        ips = res["images_per_sec"]
        head[name] = {"images_per_sec": ips, "vs_timm": ips / t if t else None, "vs_goal": ips / GOAL_IMAGES_PER_SEC}
        line = f"ours, {label:<32}  {ips:>8,.0f} images/s (data wait {100 * res['data_wait_frac']:.0f}%)"
        line += f"   {ips / t:.2f}x timm (goal {GOAL_VS_TIMM}x)" if t else "   vs timm: timm not measured"
        if name != "e2e_short_side":
            line += f", {ips / GOAL_IMAGES_PER_SEC:.2f}x the {GOAL_IMAGES_PER_SEC:,} images/s goal"
        lines.append(line)
    if t:
        head["timm"] = {"images_per_sec": t}
        lines.append(f"{'timm train.py':<38}  {t:>8,.0f} images/s (data wait {100 * timm['data_wait_frac']:.0f}%)"
                     f"   timm {timm.get('timm')}, {timm.get('train_py')}")
    else:
        why = timm.get("skipped") if isinstance(timm, dict) else "no result"
        lines.append(f"{'timm train.py':<38}  not measured ({why})")
    return head, lines


def compile_table(ours: dict) -> tuple[list[dict], list[str]]:
    """The compiled runs' warm-up (cold and warm cache, one graph per shape or one dynamic graph) and speed."""
    rows, lines = [], []
    for name, cache in (("e2e_area", "cold"), ("e2e_area_w12", "warm"), ("e2e_dynamic", "cold")):
        res = ours.get(name)
        if not measured(res) or res.get("warmup_s") is None or not res["settings"].get("compiled"):
            continue
        s, shapes, graphs = res["settings"], len(res["train_shapes"]), res.get("compile_graphs", 0)
        row = {"run": name, "compiled": s.get("compiled"), "compile_shapes": s.get("compile_shapes"), "cache": cache,
               "workers": s["workers"], "shapes": shapes, "graphs": graphs, "warmup_s": res["warmup_s"],
               "images_per_sec": res["images_per_sec"], "data_wait_frac": res["data_wait_frac"]}
        # the default area table (9 shapes): one graph per shape scales with the shapes; a dynamic graph does not
        # (its per-shape cuDNN autotuning does, a few seconds each)
        per_shape = s.get("compile_shapes") != "dynamic"
        row["warmup_9_shapes_s"] = res["warmup_s"] * DEFAULT_AREA_SHAPES / shapes if per_shape else None
        rows.append(row)
    if not rows:
        return rows, ["not measured (no compiled run finished)"]
    lines.append(f"{'run':<14} {'compile':<10} {'cache':<5} {'workers':>7} {'shapes':>6} {'graphs':>6} "
                 f"{'warm-up s':>9} {'9 shapes':>9} {'images/s':>9} {'wait':>5}")
    for r in rows:
        nine = f"{r['warmup_9_shapes_s']:9.0f}" if r["warmup_9_shapes_s"] is not None else f"{'-':>9}"
        lines.append(f"{r['run']:<14} {(r['compile_shapes'] if r['compiled'] else 'eager'):<10} {r['cache']:<5} "
                     f"{r['workers']:>7} {r['shapes']:>6} {r['graphs']:>6} {r['warmup_s']:>9.1f} {nine} "
                     f"{r['images_per_sec']:>9,.0f} {100 * r['data_wait_frac']:>4.0f}%")
    warm = next((r for r in rows if r["cache"] == "warm"), None)
    if warm is not None and warm["warmup_9_shapes_s"] is not None:
        ok = "meets" if warm["warmup_9_shapes_s"] < GOAL_WARM_WARMUP_S else "misses"
        lines.append(f"warm-up from the warm cache, scaled to the default {DEFAULT_AREA_SHAPES} shapes: "
                     f"{warm['warmup_9_shapes_s']:.0f} s ({ok} the goal of under {GOAL_WARM_WARMUP_S} s)")
    lines.append("(warm-up: compilation and cuDNN autotuning of every training shape, not counted in images/s)")
    return rows, lines


def check_lines(path: str) -> list[str]:
    """The lines of `rectrain check` that name the decoder (the region decoder, OpenCV or Pillow)."""
    try:
        with open(path) as f:
            return [line.rstrip() for line in f if "decod" in line.lower()]
    except OSError:
        return []


def ablation_text(res, rows: list[dict]) -> str:
    if isinstance(res, dict) and res.get("rows"):
        return ablation.render(res)
    if rows:  # stopped by its time limit: the rows it finished
        return "ablation (stopped by its time limit; finished rows only)\n" + ablation.rows_table(rows)
    return "ablation: no result"


def main(argv=None) -> int:
    results_dir, out_path = (argv or sys.argv[1:])[:2]
    p = lambda name: os.path.join(results_dir, name)  # noqa: E731
    ours = {name: load_json(p(f"{name}.json")) for name, _ in E2E_RUNS}
    timm = load_json(p("timm.json"))
    abl, abl_rows = load_json(p("ablation.json")), load_rows(p("ablation_rows.jsonl"))
    mdl = load_json(p("model.json"))
    try:
        with open(p("tests.txt")) as f:
            tests = f.read().strip()
    except OSError:
        tests = "not run"
    decoder = check_lines(p("check.txt"))
    head, head_lines = headline(ours, timm)
    compiled, compile_lines = compile_table(ours)
    machine = next((r["machine"] for r in (*ours.values(), abl, mdl) if isinstance(r, dict) and "machine" in r), None)
    summary = {"machine": machine, "steps": load_steps(p("steps.tsv")), "gpu_tests": tests, "decoder": decoder,
               "headline": head, "compile": compiled, "e2e": ours, "timm": timm, "model": mdl,
               "ablation": abl if isinstance(abl, dict) and abl.get("rows") else {"partial_rows": abl_rows}}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, out_path)

    print("\n=== steps: " + ", ".join(f"{s['step']} (exit {s['exit']}, {s['seconds']} s)" for s in summary["steps"]))
    print(f"=== GPU-only tests: {tests}")
    if isinstance(mdl, dict) and mdl.get("rows"):
        print("\n=== model step\n" + model.render(mdl))
    if abl is not None or abl_rows:
        print("\n=== ablation\n" + ablation_text(abl, abl_rows))
    print("\n=== decoder (rectrain check --decoder auto): " + ("; ".join(line.strip() for line in decoder)
                                                                 or "check not run"))
    print("\n=== the compiled step: warm-up and speed\n" + "\n".join(compile_lines))
    device = (machine or {}).get("gpu", "no GPU")
    e2e = next((r for r in ours.values() if measured(r)), None)
    detail = (f", batch {e2e['settings']['batch_size']}, --max_ratio {e2e['settings'].get('max_ratio')}, "
              f"{e2e['timed_steps']} steps after {e2e['skip_steps']}") if e2e else ""
    print(f"\n=== headline ({device}{detail}); goals: >= {GOAL_IMAGES_PER_SEC:,} images/s in area mode on one H200, "
          f">= {GOAL_VS_TIMM}x timm")
    print("\n".join(head_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
