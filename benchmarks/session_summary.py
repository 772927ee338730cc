"""Merge one GPU session's results into summary.json and print the tables, then the headline ratios last.

    python benchmarks/session_summary.py RESULTS_DIR OUT/summary.json

RESULTS_DIR holds what benchmarks/gpu_session.sh wrote: ``steps.tsv`` (step, exit status, seconds),
``tests.txt`` (the GPU-only tests' summary line), and the JSON of each benchmark (``e2e_area.json``,
``e2e_short_side.json``, ``timm.json``, ``model.json``, ``ablation.json`` or, when the ablation ran out of
time, its finished rows in ``ablation_rows.jsonl``). A missing or broken file becomes a note, never an error:
the summary must come back whatever else failed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rectrain.commands.bench import ablation, model  # noqa: E402

GOAL_IMAGES_PER_SEC = 6000  # issue 8: end to end from JPEG files on one H200 at 224x224 (area mode)
GOAL_VS_TIMM = 1.5


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


def headline(ours: dict, timm) -> tuple[dict, list[str]]:
    """The ratios of the issue's goals and their lines (printed last)."""
    head, lines = {}, []
    t = timm.get("images_per_sec") if measured(timm) else None
    for mode in ("area", "short_side"):
        res = ours.get(mode)
        if not measured(res):
            lines.append(f"ours, {mode:<10}  not measured" + (f" ({res['skipped']})" if isinstance(res, dict) and
                                                               res.get("skipped") else ""))
            continue
        ips = res["images_per_sec"]
        head[mode] = {"images_per_sec": ips, "vs_timm": ips / t if t else None, "vs_goal": ips / GOAL_IMAGES_PER_SEC}
        line = f"ours, {mode:<10}  {ips:>8,.0f} images/s (data wait {100 * res['data_wait_frac']:.0f}%)"
        line += f"   {ips / t:.2f}x timm (goal {GOAL_VS_TIMM}x)" if t else "   vs timm: timm not measured"
        if mode == "area":
            line += f", {ips / GOAL_IMAGES_PER_SEC:.2f}x the {GOAL_IMAGES_PER_SEC:,} images/s goal"
        lines.append(line)
    if t:
        head["timm"] = {"images_per_sec": t}
        lines.append(f"timm train.py     {t:>8,.0f} images/s (data wait {100 * timm['data_wait_frac']:.0f}%)"
                     f"   timm {timm.get('timm')}, {timm.get('train_py')}")
    else:
        why = timm.get("skipped") if isinstance(timm, dict) else "no result"
        lines.append(f"timm train.py     not measured ({why})")
    return head, lines


def ablation_text(res, rows: list[dict]) -> str:
    if isinstance(res, dict) and res.get("rows"):
        return ablation.render(res)
    if rows:  # stopped by its time limit: the rows it finished
        return "ablation (stopped by its time limit; finished rows only)\n" + ablation.rows_table(rows)
    return "ablation: no result"


def main(argv=None) -> int:
    results_dir, out_path = (argv or sys.argv[1:])[:2]
    p = lambda name: os.path.join(results_dir, name)  # noqa: E731
    ours = {"area": load_json(p("e2e_area.json")), "short_side": load_json(p("e2e_short_side.json"))}
    timm = load_json(p("timm.json"))
    abl, abl_rows = load_json(p("ablation.json")), load_rows(p("ablation_rows.jsonl"))
    mdl = load_json(p("model.json"))
    try:
        with open(p("tests.txt")) as f:
            tests = f.read().strip()
    except OSError:
        tests = "not run"
    head, head_lines = headline(ours, timm)
    machine = next((r["machine"] for r in (*ours.values(), abl, mdl) if isinstance(r, dict) and "machine" in r), None)
    summary = {"machine": machine, "steps": load_steps(p("steps.tsv")), "gpu_tests": tests, "headline": head,
               "e2e": ours, "timm": timm, "model": mdl,
               "ablation": abl if isinstance(abl, dict) and abl.get("rows") else {"partial_rows": abl_rows}}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, out_path)

    print("\n=== steps: " + ", ".join(f"{s['step']} (exit {s['exit']}, {s['seconds']} s)" for s in summary["steps"]))
    print(f"=== GPU-only tests: {tests}")
    if isinstance(mdl, dict) and mdl.get("rows"):
        print("\n=== model step\n" + model.render(mdl))
    print("\n=== ablation\n" + ablation_text(abl, abl_rows))
    device = (machine or {}).get("gpu", "no GPU")
    e2e = next((r for r in ours.values() if measured(r)), None)
    detail = (f", batch {e2e['settings']['batch_size']}, {e2e['settings']['workers']} workers, "
              f"{e2e['timed_steps']} steps after {e2e['skip_steps']}") if e2e else ""
    print(f"\n=== headline ({device}{detail}); goals: >= {GOAL_IMAGES_PER_SEC:,} images/s in area mode on one H200, "
          f">= {GOAL_VS_TIMM}x timm")
    print("\n".join(head_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
