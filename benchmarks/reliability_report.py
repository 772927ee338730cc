"""Run the fault-injection suite (tests/faults) and write docs/reliability.md from what it measured.

    python benchmarks/reliability_report.py            # the default suite (~2 min on 2 cores)
    python benchmarks/reliability_report.py --soak     # plus the long variants (make faults)
    python benchmarks/reliability_report.py --from faults.jsonl   # render an existing report only

Each test of tests/faults appends one JSON line (RECTRAIN_FAULTS_REPORT) with its case, fault, what it
measured (repetitions, runs finished, checkpoints lost, samples lost or duplicated, hangs, seconds to stop,
exit code) and its pytest result; this script turns them into the table, so the document stays true to the
code it was produced from (the commit is printed in it). Known defects are strict xfails: their rows say
"known defect" with the reason, and a fix turns them into failures until the mark is dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "reliability.md")

RESULT_TEXT = {"passed": "ok", "xfailed": "**known defect**", "failed": "**FAILED**", "error": "**ERROR**",
               "xpassed": "**fixed? (xfail passed)**", "skipped": "not run (soak)"}

# What the user (or the scheduler) does after each kind of fault.
ACTIONS = [
    ("1 kill -9", "Run the same command again with `--resume auto`: it takes the newest checkpoint that loads "
                  "(end of an epoch, or a mid-epoch stop) and continues with the same data order, so the run ends "
                  "as if it had not been killed. Work since that checkpoint is redone."),
    ("2 stop signals", "Exit status 128 + the signal (143 SIGTERM, 130 SIGINT, 129 SIGHUP, 138 SIGUSR1): `last.pth` "
                       "was saved at the next step boundary. Requeue the same command with `--resume auto` (SLURM: "
                       "`#SBATCH --requeue` and `--signal=USR1@120` or `TERM@120` so the job is told before its time "
                       "ends). A second Ctrl-C stops at once, without saving."),
    ("3 rank failure", "The job exits non-zero and the first error line names the failed rank; its own log is "
                       "`logs/rank{R}.log`. Fix the cause, then `--resume auto`. Under `torchrun --max-restarts N` "
                       "put `--resume auto` in the command: a restart then continues from the last checkpoint."),
    ("4 resume across changes", "Another `--nproc` or `--batch_size`: `--resume auto` keeps the position in the "
                                "learning-rate schedule (a mid-epoch checkpoint restarts its epoch). To continue "
                                "another run's checkpoint, give it a new folder: `--resume PATH --run_name NEW`."),
    ("5 corrupt checkpoint", "`--resume auto` takes the checkpoint furthest in training (by the step recorded "
                             "inside, not the file time), skips one that does not load or fails its CRC check (the "
                             "log says which and why) and takes the previous one; `--resume PATH` refuses it with "
                             "the reason: pick another file."),
    ("6 bad images", "Nothing to do for odd but valid images. Unusable files are excluded and listed: "
                     "`rectrain scan --data_dir D` prints each with its reason; fix or delete them. Files that stop "
                     "decoding during a run are replaced and counted; past `--max_decode_failures` the run stops "
                     "(exit 2): check the storage, then `--resume auto`."),
    ("7 disk full", "Exit status 2 with one line; the previous checkpoint is intact. Free space (or copy the run "
                    "folder to a larger disk and point `--output` there), then `--resume auto`."),
    ("8 bad configuration", "Exit status 2 with one line naming the flag or key and the fix; nothing was written. "
                            "Correct it and run again."),
    ("9 NaN loss", "Exit status 2 naming the step; the last good checkpoint is kept. Lower `--lr` (e.g. half) or "
                   "`--weight_decay`, then `--resume auto`."),
    ("10 uneven DDP data", "Nothing to do: every rank takes part in every step and validation counts every image "
                           "once."),
    ("11 data set changes", "Nothing to do: the scan cache is keyed by the file list (paths, sizes, modification "
                            "times) and rebuilt when it changes. A file replaced with its size and time kept (`cp -p`, "
                            "`rsync -t`) keeps its cached size: its crop is placed by fractions of the real image, "
                            "so it may shift but never breaks, and a file that no longer decodes is replaced in its "
                            "batch and counted. `rectrain scan --rescan` (or deleting the cache) reads it afresh. `rectrain scan` shows the new counts."),
    ("12 process exit", "The process exits by itself when a run ends and after a crash. If one ever stays after "
                        "its last line (see the known defects above), its checkpoints and outputs are complete: end "
                        "it with `kill PID` and carry on."),
    ("13 two runs, one folder", "The second run stops at once (exit 2) naming the holder's host and PID: wait for "
                                "it, stop it, or pass another `--run_name`. A lock left by a run that died (kill -9 "
                                "included) is taken over with a note."),
    ("14 records", "Nothing to do: `--resume auto` keeps every metrics and step row written before the stop, "
                   "rebuilds an epoch row a kill lost from the checkpoint, and drops a torn last line. A full disk "
                   "ends in one line naming the file: free space, then `--resume auto`."),
]

EXIT_CODES = [
    ("0", "finished", "done"),
    ("2", "user error: one line says what to change (flag, data, disk, NaN, corrupt checkpoint)",
     "do not requeue as is: fix, then `--resume auto`"),
    ("143 / 130 / 129 / 138 (128 + signal)", "stopped by SIGTERM / SIGINT / SIGHUP / SIGUSR1 after saving `last.pth`",
     "preempted: requeue with `--resume auto`"),
    ("1", "crash: a bug or a failed rank (traceback in the log)",
     "read `logs/rank*.log`; after a fix, `--resume auto`"),
    ("137 / -9 (SIGKILL)", "killed without warning (OOM killer, `kill -9`, node loss)",
     "requeue with `--resume auto` (work since the last checkpoint is redone)"),
]


def run_suite(jsonl: str, soak: bool, pytest_args: list[str]) -> tuple[int, float]:
    env = dict(os.environ, RECTRAIN_FAULTS_REPORT=jsonl)
    if soak:
        env["RECTRAIN_FAULTS_SOAK"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults", *pytest_args]
    print("running:", " ".join(cmd), "(soak)" if soak else "", flush=True)
    t0 = time.time()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    return code, time.time() - t0


def read_rows(jsonl: str) -> list[dict]:
    with open(jsonl) as f:
        return [json.loads(line) for line in f if line.strip()]


def _variant(nodeid: str) -> str:
    return nodeid[nodeid.index("[") + 1:-1] if nodeid.endswith("]") else ""


def _num(v, digits=1) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, list):
        return ", ".join(_num(x, digits) for x in v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _case_key(row: dict):
    case = row.get("case") or "?"
    number = case.split()[0]
    return (int(number) if number.isdigit() else 99, case, row.get("test", ""))


def table(rows: list[dict]) -> list[str]:
    out = ["| case | fault | variant | tries | runs finished | checkpoints lost | samples lost / duplicated | "
           "hangs | s to stop | exit code | result |",
           "|---|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in sorted(rows, key=_case_key):
        lost, dup = r.get("samples_lost"), r.get("samples_duplicated")
        samples = "-" if lost is None and dup is None else f"{_num(lost)} / {_num(dup)}"
        result = RESULT_TEXT.get(r.get("result"), r.get("result"))
        if r.get("result") == "xfailed" and r.get("defect"):
            result += ": " + r["defect"].removeprefix("defect").lstrip(" 0123456789:")
        if r.get("note"):
            result += f" ({r['note']})"
        cells = [r.get("case"), r.get("fault"), _variant(r.get("test", "")) or "-", _num(r.get("repetitions")),
                 _num(r.get("runs_finished")), _num(r.get("checkpoints_lost")), samples, _num(r.get("hangs")),
                 _num(r.get("seconds_to_stop")), _num(r.get("exit_code")), result]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return out


def known_defects(rows: list[dict]) -> list[str]:
    """The strict xfails (and unexpected failures), one line each: what the lead fixes next."""
    bad = [r for r in sorted(rows, key=_case_key) if r.get("result") in ("xfailed", "failed", "error", "xpassed")]
    if not bad:
        return []
    lines = ["## Known defects and failures", "",
             "Each is a strict xfail (a fix makes its test fail until the mark is dropped), or a failure of this run:", ""]
    for r in bad:
        why = r.get("defect") or r.get("note") or "see the test's output"
        lines.append(f"- `{r['test'].removeprefix('tests/faults/')}` ({RESULT_TEXT.get(r['result'], r['result'])}): "
                     f"{why}")
    return [*lines, ""]


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def render(rows: list[dict], soak: bool, seconds: float | None, command: str) -> str:
    import torch  # the version in the header
    counts = Counter(r.get("result") for r in rows)
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    ran = [r for r in rows if r.get("result") != "skipped"]
    summary = (f"{len(ran)} fault tests ran: {counts.get('passed', 0)} kept the promise, "
               f"{counts.get('xfailed', 0)} are known defects (strict xfail, listed below), "
               f"{counts.get('failed', 0) + counts.get('error', 0)} failed unexpectedly"
               + (f", {counts['xpassed']} known defects now pass (drop their xfail)" if counts.get("xpassed") else "")
               + (f"; {counts['skipped']} soak variants not run" if counts.get("skipped") else "") + ".")
    lines = [
        "# Reliability: what happens when the trainer is killed, corrupted or starved",
        "",
        "This page is generated by `benchmarks/reliability_report.py` from the fault-injection suite "
        "(`tests/faults`): every row is a test that ran the real CLI (`python -m rectrain train ...`) in a "
        "subprocess on tiny generated data (ResNet-18 at width 8, 32 px, `--deterministic`, 2 DataLoader workers), "
        "injected the fault, and measured the outcome. Do not edit it by hand; rerun:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- commit `{commit}`{dirty}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; "
        f"{platform.platform()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}; {'default and soak variants' if soak else 'default variants (soak: `--soak`)'}"
        + (f"; {seconds:.0f} s" if seconds else ""),
        f"- {summary}",
        "",
        "How faults are injected: signals and `kill -9` are real (`os.kill` of the main process, or `os.killpg` of "
        "the whole process group, DataLoader workers included, as SLURM and systemd do); corrupt checkpoints, bad "
        "images and changed data sets are real files. Disk-full, NaN losses, exceptions on one rank and slow steps "
        "or saves (to hit a moment reliably) come from `tests/faults/inject/sitecustomize.py`, which the test puts "
        "on the trainer's `PYTHONPATH`. Two-process runs use gloo on the CPU; there a dead rank's closed TCP "
        "connections wake its peers at once, which NCCL does not do, so those tests keep the failed rank's "
        "connections open (a forked child holds them) and the peers must stop on their own: within "
        "15 s, where a stuck collective would take `--dist_timeout` (60 s in the tests, 1800 s by default).",
        "",
        "Columns: *tries* = faults injected; *runs finished* = runs that completed after the fault (with "
        "`--resume auto` where the case resumes); *checkpoints lost* = checkpoints that were there before the fault "
        "and were missing, changed or unreadable after it; *samples lost / duplicated* = 0 / 0 where the resumed "
        "run ended bit-identical to an uninterrupted one (same steps, same weights); *s to stop* = seconds from "
        "the fault to the exit of every process; *exit code* of the interrupted run (-9: killed by SIGKILL).",
        "",
        *table(rows),
        "",
        *known_defects(rows),
        "## Exit codes, for schedulers",
        "",
        "| status | meaning | what to do |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in EXIT_CODES],
        "",
        "## What to do after each fault",
        "",
        *[f"- **{case}**: {text}" for case, text in ACTIONS],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--soak", action="store_true", help="also run the long variants (RECTRAIN_FAULTS_SOAK=1)")
    p.add_argument("--from", dest="source", metavar="JSONL", help="render this report instead of running the suite")
    p.add_argument("--out", default=DOC, help="markdown file to write (default: docs/reliability.md)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    seconds, code = None, 0
    if args.source:
        jsonl = args.source
    else:
        fd, jsonl = tempfile.mkstemp(prefix="rectrain_faults_", suffix=".jsonl")
        os.close(fd)
        code, seconds = run_suite(jsonl, args.soak, args.pytest_args)
    rows = read_rows(jsonl)
    if not rows:
        print(f"no rows in {jsonl}: did the suite run?", file=sys.stderr)
        return 1
    command = "python benchmarks/reliability_report.py" + (" --soak" if args.soak else "")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    page = render(rows, args.soak, seconds, command)  # before opening the page: truncating it first made git
    with open(args.out, "w") as f:                     # status call every run "with uncommitted changes"
        f.write(page)
    counts = Counter(r.get("result") for r in rows)
    print(f"wrote {args.out}: {dict(counts)} (rows from {jsonl}); pytest exit status {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
