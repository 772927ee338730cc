"""Every command shown in README.md and docs/*.md works as documented, so the docs cannot rot.

Fenced blocks tagged ``bash``, ``sh``, ``shell`` or ``console`` (only its ``$ `` lines) are split into simple
commands: continuation lines joined, comments dropped, split at ``;``, ``&&``, ``||``, ``|`` and ``&``,
redirections dropped, ``VAR=value`` prefixes and wrappers (``nohup``, ``time``) taken off. Each command is then
handled by the rule for its program (``check_command``):

- **run**: ``rectrain ...``, ``python train_g4.dn_12xlarge.py``, ``python model.py`` ... run in a fresh process
  (forked from a server that imported torch once: a plain interpreter would spend seconds per command on
  imports) in an empty working folder, and must exit 0 within ``TIMEOUT_S``. Before the run, the command as
  written must parse and validate (``resolve_config`` for training flags), and what it names is put in place:
  ``--data_dir`` is replaced by one tiny shared dataset, a checkpoint path (``--checkpoint``, ``--resume``,
  ``--initial_checkpoint``, and the run folder of ``--resume auto``) gets a copy of one tiny checkpoint,
  ``--config`` files are the repository's, image paths given to ``predict`` get tiny images, and absolute
  output paths move into the working folder. Tiny settings (``TINY_FLAGS``) are appended, so they win.
- **parse**: commands that need GPUs, several nodes or a benchmark machine (torchrun, srun, ``--compile``,
  ``--device cuda``, ONNX export without its packages, ``rectrain bench`` other than ``loader``,
  ``benchmarks/*.py``): their arguments are checked (torchrun's own with torchrun's parser, rectrain's with
  ``resolve_config`` or the command's parser, a benchmark script's with its ``--help``).
- **not run**, with a check where one is possible: ``make`` targets (``make -n``), shell scripts
  (``bash -n``), pytest (the files it names exist), package installs (the package must be one the code
  uses), ``tensorboard`` (its --logdir is where runs go), viewers, shell plumbing.

A program without a rule fails its test: add a rule, or show the line in a ``text`` block. Other blocks:
``toml`` must be a valid ``--config`` file, ``python`` must compile, any other tag is illustrative output
and not run; a block without a tag fails (say what it is).
"""

from __future__ import annotations

import ast
import glob
import multiprocessing
import os
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass, field

import pytest
import torch

from rectrain.config import resolve_config
from rectrain.data.index import IMAGE_EXTENSIONS
from rectrain.errors import UserError
from rectrain.model import build_model
from rectrain.training.checkpoint import load as load_ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
TIMEOUT_S = 180  # per command; a tiny run takes about a second once torch is imported

RUN_TAGS = {"bash", "sh", "shell", "console"}

# Appended to documented commands (argparse: the last value wins). ``DATA`` is replaced by the tiny dataset.
TINY_TRAIN = ("--data_dir DATA --arch resnet18 --width 8 --target_size 32 --val_target_size 32 --batch_size 4 "
              "--val_batch_size 4 --epochs 1 --max_steps 2 --warmup_epochs 0 --workers 0 --device cpu --nproc 1 "
              "--progress off --print_freq 1").split()
TINY_FLAGS = {  # rectrain command (and bench target) -> tiny settings; a command not here is only parsed
    "train": TINY_TRAIN,
    "check": [a for a in TINY_TRAIN if a not in ("--max_steps", "2")] + ["--no_loader_probe"],
    "eval": "--device cpu --workers 0 --nproc 1 --batch_size 4".split(),
    "predict": "--device cpu --workers 0 --batch_size 4".split(),
    "export": [],
    "scan": "--workers 0 --target_size 32 --batch_size 4".split(),
    "prepare": "--workers 0".split(),
    "synth": "--classes 2 --train_per_class 2 --val_per_class 1 --kind tiny --workers 0".split(),
    "bench loader": "--workers 0 --batch_size 4 --target_size 32 --batches 2 --warmup 1".split(),
    "model": "--arch resnet18 --batch 2 --sizes 32x32,32x64 --num_classes 10".split(),
}
SCRIPTS = {"train_g4.dn_12xlarge.py": "train", "model.py": "model"}  # the seed's scripts -> their rectrain command
PYTHONS = {"python", "python3", ".venv/bin/python", ".venv/bin/python3"}
RECTRAINS = {"rectrain", ".venv/bin/rectrain"}
WRAPPERS = {"nohup", "time", "exec", "env"}
SHELL_WORDS = {"for", "do", "done", "if", "then", "else", "fi", "while", "cd", "export", "mkdir", "echo", "ls",
               "du", "df", "cat", "head", "tail", "tee", "cp", "mv", "rm", "kill", "sleep", "watch", "git", "seq"}
NOT_RUN = {  # program -> why it is not run here (some still get a check in ``check_not_run``)
    ".": "activates the virtualenv in the reader's shell", "source": "activates the virtualenv in the reader's shell",
    "pip": "installs packages (network)", "tensorboard": "a viewer that serves until stopped",
    "nvidia-smi": "needs an NVIDIA GPU", "sbatch": "needs SLURM", "scontrol": "needs SLURM", "squeue": "needs SLURM",
    "sed": "edits a file of the repository", **{w: "shell plumbing" for w in SHELL_WORDS},
}
CHECKPOINT_FLAGS = ("--checkpoint", "--initial_checkpoint", "--resume")
OUTPUT_FLAGS = ("--out", "--output")


# ---------------------------------------------------------------------------------------------
# Extraction: documents -> fenced blocks -> simple commands


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    tag: str
    text: str


@dataclass
class Command:
    doc: str
    line: int
    argv: list[str]
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}: {' '.join(self.argv)[:70]}"


def fenced_blocks(doc: str) -> list[Block]:
    blocks, open_fence = [], None
    with open(os.path.join(ROOT, doc)) as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines, 1):
        m = re.match(r"\s*(`{3,}|~{3,})\s*([\w+-]*)", line)
        if open_fence is None and m:
            open_fence, start, tag, body = m.group(1), i, m.group(2).lower(), []
        elif open_fence is not None and line.strip().startswith(open_fence) and not line.strip()[len(open_fence):]:
            blocks.append(Block(doc, start, tag, "\n".join(body)))
            open_fence = None
        elif open_fence is not None:
            body.append(line)
    return blocks


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, text) of each command line: continuations joined; console blocks: ``$ `` lines only."""
    out, pending, first = [], "", 0
    for k, line in enumerate(block.text.splitlines(), block.line + 1):
        if block.tag == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue
            line = line.lstrip()[2:]
        if not pending:
            first = k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((first, pending + line))
        pending = ""
    return out


def simple_commands(text: str) -> list[list[str]]:
    """Split one shell line into simple commands (argv lists); comments and redirections are dropped."""
    text = re.sub(r"\$\([^()]*\)", "SUBST", text)   # $(...) substitutions: not commands of ours
    text = re.sub(r"\d*>&\d+", " ", text)            # 2>&1
    text = re.sub(r"(^|\s)\d>", r"\1>", text)         # 2> file
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|<>()")
    lex.whitespace_split, lex.commenters = True, "#"
    commands, current, skip_next = [], [], False
    for token in lex:
        if skip_next:
            skip_next = False
        elif token in (">", ">>", "<", ">|"):
            skip_next = True  # the redirection's target
        elif set(token) <= set(";&|()"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def split_env(argv: list[str]) -> tuple[dict, list[str]]:
    """Leading ``VAR=value`` words and wrappers (nohup, time) off: (environment, the command itself)."""
    env, i = {}, 0
    while i < len(argv) and (re.match(r"[A-Za-z_][A-Za-z0-9_]*=", argv[i]) or argv[i] in WRAPPERS):
        if "=" in argv[i]:
            key, value = argv[i].split("=", 1)
            env[key] = value
        i += 1
    return env, argv[i:]


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        for block in fenced_blocks(doc):
            if block.tag not in RUN_TAGS:
                continue
            for line, text in logical_lines(block):
                for argv in simple_commands(text):
                    env, argv = split_env(argv)
                    if argv and argv[0] in ("do", "then", "else"):  # `for ...; do CMD; done`: CMD is a command
                        argv = argv[1:]
                    if argv:
                        commands.append(Command(doc, line, argv, env))
    return commands


COMMANDS = documented_commands()
BLOCKS = [b for doc in DOCS for b in fenced_blocks(doc)]


# ---------------------------------------------------------------------------------------------
# What a command is: an entry point (how Python starts it) and, for ours, a rectrain command line


@dataclass
class Invocation:
    """How to start the command: ``kind`` is cli (the rectrain console script), module (python -m rectrain),
    script (python FILE) or code (python -c); ``argv`` are the arguments after the program/script."""
    kind: str
    argv: list[str]
    target: str = ""          # script path or code
    command: str | None = None  # the rectrain command it runs (train, eval, ...), None for other scripts

    def rectrain_argv(self) -> list[str]:
        """The same command as ``rectrain`` arguments (a seed script's argv gets its command in front)."""
        return self.argv if self.kind in ("cli", "module") else [self.command, *self.argv]


def python_invocation(args: list[str]) -> Invocation | str:
    """``python [-u] (-m MODULE | -c CODE | SCRIPT) ARGS`` -> Invocation, or what it is when it is not run here:
    "pytest" (the test suite) or "script" (a benchmark script without argparse: it exists)."""
    while args and args[0] in ("-u", "-B", "-O", "-X"):
        args = args[1:]
    if args[:2] == ["-m", "rectrain"]:
        return Invocation("module", args[2:], command=args[2] if len(args) > 2 else None)
    if args[:1] == ["-c"]:
        return Invocation("code", [], target=args[1])
    if args[:2] == ["-m", "pytest"]:
        return "pytest"
    if args[:1] == ["-m"]:
        pytest.fail(f"python -m {args[1]}: no rule for this module in tests/test_docs.py")
    script = args[0]
    if not os.path.isfile(os.path.join(ROOT, script)):
        pytest.fail(f"{script}: no such file in the repository")
    path = os.path.join(ROOT, script)
    if script.startswith("benchmarks/"):  # a benchmark machine's job: its arguments are checked with --help
        with open(path) as fh:
            return Invocation("script", [*args[1:], "--help"], target=path) if "argparse" in fh.read() else "script"
    return Invocation("script", args[1:], target=path, command=SCRIPTS.get(script))


# ---------------------------------------------------------------------------------------------
# Shared tiny inputs


@pytest.fixture(scope="module")
def tiny(tiny_run, tmp_path_factory):
    """The suite's shared tiny dataset and checkpoint (``tiny_run``), with copies of the checkpoint that hold EMA
    weights (for ``--ema``) and standard-width weights (torchvision export needs width 64)."""
    root = tmp_path_factory.mktemp("docs")
    ckpt = load_ckpt(tiny_run.ckpt)
    ckpt["model_ema"] = {k: v.clone() for k, v in ckpt["model"].items()}
    torch.save(ckpt, root / "ema.pth")
    ckpt["model"] = build_model("resnet18", num_classes=len(ckpt["classes"]), width=64).state_dict()
    ckpt["config"]["width"] = 64
    del ckpt["model_ema"]
    torch.save(ckpt, root / "wide.pth")
    image = sorted(glob.glob(os.path.join(tiny_run.data, "val", "*", "*.jpg")))[0]
    return {"data": tiny_run.data, "ckpt": str(root / "ema.pth"), "wide": str(root / "wide.pth"), "image": image}


@pytest.fixture(scope="module")
def runner():
    """Runs commands in fresh processes forked from a server that has imported torch and rectrain once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "PIL.Image", "cv2", "matplotlib.figure",
                                "matplotlib.backends.backend_agg", "rectrain.cli", "rectrain.trainer",
                                "rectrain.inference", "rectrain.commands.predict", "rectrain.commands.export",
                                "rectrain.checklist", "rectrain.commands.check", "rectrain.commands.model",
                                "rectrain.data.prepare", "rectrain.data.synth", __name__])
    return ctx


def run_invocation(ctx, inv: Invocation, cwd: str, env: dict) -> tuple[int, str]:
    """Start ``inv`` in a fresh process in ``cwd``; returns (exit status, its stdout and stderr)."""
    log = os.path.join(cwd, ".command.log")
    proc = ctx.Process(target=_child, args=(inv, cwd, log, env))
    proc.start()
    proc.join(TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"did not finish within {TIMEOUT_S} s:\n{_read(log)}")
    return proc.exitcode, _read(log)


def _read(path: str) -> str:
    if not os.path.exists(path):
        return "(the process died before writing any output)"
    with open(path, errors="replace") as fh:
        return fh.read()[-6000:]


def _child(inv: Invocation, cwd: str, log: str, env: dict) -> None:
    """In the fresh process: output to ``log``, then start the program as Python would; exit with its status."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(1, "w", closefd=False)
    os.chdir(cwd)
    os.environ.update(env)
    code = 1
    try:
        code = _start(inv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _start(inv: Invocation) -> int:
    import runpy

    # Tiny runs: one thread, and no oneDNN, whose kernel generation in every fresh process costs more than the
    # run itself (0.7 s against 0.04 s for a first ResNet-18 step at 32 px). Neither changes what is tested.
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False

    if inv.kind == "cli":  # what the `rectrain` console script does
        from rectrain.cli import main
        return main(inv.argv)
    if inv.kind == "code":
        exec(compile(inv.target, "<-c>", "exec"), {"__name__": "__main__"})
        return 0
    if inv.kind == "module":
        sys.argv = ["rectrain", *inv.argv]
        runpy.run_module("rectrain", run_name="__main__", alter_sys=True)
        return 0
    sys.argv = [inv.target, *inv.argv]
    sys.path.insert(0, os.path.dirname(inv.target))
    runpy.run_path(inv.target, run_name="__main__")
    return 0


# ---------------------------------------------------------------------------------------------
# Putting in place what a command names


def in_workspace(path: str, ws: str) -> str:
    """A documented path inside the working folder (an absolute one keeps its parts: /data/x -> WS/data/x)."""
    return os.path.join(ws, path.lstrip("/")) if os.path.isabs(path) else path


def place_checkpoint(src: str, path: str, ws: str, tiny: dict) -> None:
    """A copy of ``src`` at ``path``, describing a run of the folder it lies in (as a real checkpoint does)."""
    full = os.path.join(ws, path)
    if os.path.exists(full):
        return
    os.makedirs(os.path.dirname(full) or ".", exist_ok=True)
    ckpt = load_ckpt(src)
    ckpt_dir = os.path.dirname(os.path.normpath(path))
    if os.path.basename(ckpt_dir) == "checkpoints":  # {output}/{run_name}/checkpoints/FILE
        run_dir = os.path.dirname(ckpt_dir)
        ckpt["config"].update(output=os.path.dirname(run_dir) or ".", run_name=os.path.basename(run_dir))
    ckpt["config"]["data_dir"] = tiny["data"]
    torch.save(ckpt, full)


def flag_values(argv: list[str]) -> list[str]:
    """``--flag=value`` written as two words, as argparse reads it."""
    out = []
    for a in argv:
        out.extend(a.split("=", 1) if a.startswith("--") and "=" in a else [a])
    return out


def prepare_rectrain(argv: list[str], ws: str, tiny: dict) -> list[str]:
    """The documented ``rectrain`` arguments with data, config, checkpoint and output paths put in place."""
    argv, command = flag_values(argv), argv[0]
    out = list(argv)
    for i, a in enumerate(argv[:-1]):
        value = argv[i + 1]
        if a == "--data_dir":
            out[i + 1] = tiny["data"]
        elif a == "--config":
            assert os.path.isfile(os.path.join(ROOT, value)), f"--config {value}: no such file in the repository"
            out[i + 1] = os.path.join(ROOT, value)
        elif a in CHECKPOINT_FLAGS and value != "auto":
            out[i + 1] = in_workspace(value, ws)
            wide = command == "export" and "torchvision" in argv
            place_checkpoint(tiny["wide"] if wide else tiny["ckpt"], out[i + 1], ws, tiny)
        elif a in OUTPUT_FLAGS:
            out[i + 1] = in_workspace(value, ws)
    if command == "predict":
        place_images(out, ws, tiny)
    return out


def place_images(argv: list[str], ws: str, tiny: dict) -> None:
    """``predict``'s PATH arguments: a tiny image at each file name, two in each folder."""
    from rectrain.cli import build_parser
    args = build_parser("predict").parse_args(argv)
    for path in args.paths:
        full = in_workspace(path, ws)
        argv[argv.index(path)] = full
        full = os.path.join(ws, full)
        if os.path.splitext(full)[1].lower() in IMAGE_EXTENSIONS:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            shutil.copy(tiny["image"], full)
        else:
            os.makedirs(full, exist_ok=True)
            for k, src in enumerate(sorted(glob.glob(os.path.join(tiny["data"], "val", "*", "*.jpg")))[:2]):
                shutil.copy(src, os.path.join(full, f"{k}.jpg"))


# ---------------------------------------------------------------------------------------------
# Checking and running one rectrain command


def parse_rectrain(argv: list[str]):
    """The command's parser accepts ``argv``; training flags also validate. Returns the TrainConfig or None."""
    from rectrain.cli import build_parser
    from rectrain.commands.check import OWN_FLAGS
    try:
        build_parser(argv[0], argv).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`rectrain {' '.join(argv)}` does not parse (exit {e.code})")
    if argv[0] in ("train", "check"):
        return resolve_config([a for a in argv[1:] if a not in OWN_FLAGS])
    return None


def tiny_settings(argv: list[str], cfg, tiny: dict) -> list[str] | None:
    """What to append so the command runs tiny on this CPU; None when it can only be parsed here."""
    key = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    if key not in TINY_FLAGS:
        return None
    if cfg is not None and (cfg.compile == "on" or cfg.cuda_graphs or cfg.device.startswith("cuda")
                            or getattr(cfg, "decode", "cpu") == "gpu"):
        return None  # GPU-only settings
    if argv[0] == "export" and "onnx" in argv and not _has("onnx", "onnxscript"):
        return None
    extra = [tiny["data"] if a == "DATA" else a for a in TINY_FLAGS[key]]
    if cfg is not None and cfg.res_schedule:
        extra += ["--res_schedule", "32:32:0:0"]  # one epoch at the tiny size
    return extra


def _has(*modules: str) -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in modules)


def check_rectrain(inv: Invocation, env: dict, ws: str, tiny: dict, runner, run: bool = True) -> None:
    rargv = inv.rectrain_argv()
    if not rargv or rargv[0] is None or {"-h", "--help"} & set(rargv):
        code, out = run_invocation(runner, inv, ws, env)  # `--help`: must print the help and exit 0
        assert code == 0, out
        return
    prepared = prepare_rectrain(rargv, ws, tiny)
    cfg = parse_rectrain(prepared)
    extra = tiny_settings(prepared, cfg, tiny) if run else None
    if extra is None:
        return  # arguments checked; this command needs a GPU, nodes or packages this machine lacks
    if cfg is not None and cfg.resume == "auto":  # the run folder holds a checkpoint to continue from
        place_checkpoint(tiny["ckpt"], os.path.join(cfg.output, cfg.run_name, "checkpoints", "last.pth"), ws, tiny)
    args = prepared + extra
    inv = Invocation(inv.kind, args if inv.kind in ("cli", "module") else args[1:], inv.target, inv.command)
    code, out = run_invocation(runner, inv, ws, env)
    assert code == 0, f"exit status {code}:\n{out}"


# ---------------------------------------------------------------------------------------------
# Rules by program


def check_not_run(argv: list[str]) -> None:
    """What can be checked of a command that is not run here."""
    prog = argv[0]
    if prog in (".", "source"):
        venv = argv[1].split("/bin/")[0]
        makefile = open(os.path.join(ROOT, "Makefile")).read()
        assert re.search(rf"^VENV\s*\??=\s*{re.escape(venv)}\s*$", makefile, re.M), f"the Makefile does not make {venv}"
    elif prog == "pip" and argv[1:2] == ["install"]:
        files = glob.glob(os.path.join(ROOT, "rectrain", "**", "*.py"), recursive=True)
        sources = " ".join(open(p).read() for p in files)
        for pkg in (a for a in argv[2:] if not a.startswith("-") and a != "."):
            assert pkg in sources, f"pip install {pkg}: the code never uses {pkg}"
    elif prog == "tensorboard":
        from rectrain.config import TrainConfig
        logdir = argv[argv.index("--logdir") + 1]
        assert os.path.normpath(logdir) == os.path.normpath(TrainConfig().output), "not where runs are written"
    elif prog == "sed":
        assert os.path.isfile(os.path.join(ROOT, argv[-1])), f"sed edits {argv[-1]}, which does not exist"


def check_pytest(args: list[str]) -> str:
    """The test suite is not run from inside itself; the test files and folders it names must exist."""
    for a in args:
        path = a.split("::")[0]
        if not a.startswith("-") and path.startswith("tests"):
            assert os.path.exists(os.path.join(ROOT, path)), f"pytest {a}: no such test file or folder"
    return "not run: the test suite"


def check_command(cmd: Command, ws: str, tiny: dict, runner, run: bool = True) -> str:
    """Check or run ``cmd`` by the rule for its program; returns what was done. ``run=False``: parse only (the
    program of a launcher such as srun)."""
    prog, args = cmd.argv[0], cmd.argv[1:]
    if prog in RECTRAINS:
        check_rectrain(Invocation("cli", args, command=args[0] if args else None), cmd.env, ws, tiny, runner, run)
        return "run" if run else "parsed"
    if prog in PYTHONS:
        inv = python_invocation(args)
        if inv == "pytest":
            return check_pytest(args[2:])
        if inv == "script":
            return "not run: a benchmark script (it exists)"
        if inv.command is not None or inv.kind == "module":
            check_rectrain(inv, cmd.env, ws, tiny, runner, run)
        elif run:
            code, out = run_invocation(runner, inv, ws, cmd.env)
            assert code == 0, f"exit status {code}:\n{out}"
        return "run" if run else "parsed"
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser
        try:
            targs = get_args_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"torchrun {' '.join(args)}: torchrun's options do not parse")
        inner = [targs.training_script, *targs.training_script_args]
        inv = (Invocation("module", inner[1:], command=inner[1]) if targs.module and inner[0] == "rectrain"
               else python_invocation(inner))
        check_rectrain(inv, cmd.env, ws, tiny, runner, run=False)
        return "parsed"
    if prog == "srun":  # srun [options] PROGRAM ...: the program's arguments
        start = next((i for i, a in enumerate(args) if a in PYTHONS | RECTRAINS | {"torchrun"}), None)
        if start is None:
            pytest.fail(f"srun {' '.join(args)}: no program of ours to check")
        return check_command(Command(cmd.doc, cmd.line, args[start:], cmd.env), ws, tiny, runner, run=False)
    if prog == "pytest":
        return check_pytest(args)
    if prog == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        proc = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return "checked (make -n)"
    if prog in ("bash", "sh"):
        script = os.path.join(ROOT, args[0])
        assert os.path.isfile(script), f"{args[0]}: no such script"
        assert subprocess.run(["bash", "-n", script]).returncode == 0
        return "checked (bash -n)"
    if prog in NOT_RUN:
        check_not_run(cmd.argv)
        return f"not run: {NOT_RUN[prog]}"
    pytest.fail(f"no rule for `{prog}` in tests/test_docs.py: add one (or show the line in a ```text block)")


# ---------------------------------------------------------------------------------------------
# Tests


def test_docs_show_commands():
    assert any(c.doc == "README.md" and c.argv[:2] == ["make", "demo"] for c in COMMANDS)
    assert sum(c.argv[0] in RECTRAINS | PYTHONS for c in COMMANDS) >= 10


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.id)
def test_documented_command_works(cmd, tiny, runner, tmp_path, record_property):
    record_property("handled", check_command(cmd, str(tmp_path), tiny, runner))  # run, parsed, checked, not run


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b.doc}:{b.line}:{b.tag or 'untagged'}")
def test_code_block_says_what_it_is(block, tmp_path):
    if not block.tag:
        pytest.fail("tag the block: ```bash (commands: they are run), ```text (output) or ```toml/```python")
    if block.tag == "toml":  # a config file: it must load and validate
        path = tmp_path / "block.toml"
        path.write_text(block.text)
        resolve_config(["--config", str(path)])
    elif block.tag == "python":
        compile(block.text, f"{block.doc}:{block.line}", "exec")


def test_readme_package_map_names_every_subpackage_and_top_level_module():
    readme = open(os.path.join(ROOT, "README.md")).read()
    pkg = os.path.join(ROOT, "rectrain")
    places = sorted(f"rectrain/{n}/" if os.path.isdir(os.path.join(pkg, n)) else f"rectrain/{n}"
                    for n in os.listdir(pkg) if not n.startswith(("_", ".")) and (n.endswith(".py") or
                                                                                 os.path.isdir(os.path.join(pkg, n))))
    missing = [m for m in places if f"`{m}`" not in readme]
    assert not missing, f"README.md's package map does not name {missing}"


def test_every_module_opens_with_a_docstring_saying_what_it_owns():

    modules = glob.glob(os.path.join(ROOT, "rectrain", "**", "*.py"), recursive=True)
    bare = [os.path.relpath(m, ROOT) for m in modules if os.path.basename(m) != "__main__.py"
            and not ast.get_docstring(ast.parse(open(m).read()))]
    assert not bare, f"modules without a docstring: {bare}"


# The extraction itself, on made-up lines


def test_extraction_joins_continuations_and_drops_comments_and_output():
    block = Block("x.md", 1, "bash", "python a.py --x 1 \\\n    --y 2   # a comment\n# only a comment")
    commands = [c for _, text in logical_lines(block) for c in simple_commands(text)]
    assert commands == [["python", "a.py", "--x", "1", "--y", "2"]]
    console = Block("x.md", 1, "console", "$ rectrain model\nparameters: 25,557,032")
    assert [t for _, t in logical_lines(console)] == ["rectrain model"]


def test_extraction_splits_shell_operators_and_drops_redirections():
    line = "nohup python t.py --d /x > log.txt 2>&1 & A=1 rectrain eval --checkpoint c.pth | tee out; ls $(pwd)"
    cmds = simple_commands(line)
    assert cmds == [["nohup", "python", "t.py", "--d", "/x"], ["A=1", "rectrain", "eval", "--checkpoint", "c.pth"],
                    ["tee", "out"], ["ls", "SUBST"]]
    assert split_env(cmds[1]) == ({"A": "1"}, ["rectrain", "eval", "--checkpoint", "c.pth"])
    assert split_env(cmds[0])[1][0] == "python"


# The checks themselves catch what rots


def test_a_misspelt_flag_fails_the_check(tiny, runner, tmp_path):
    cmd = Command("x.md", 1, ["rectrain", "train", "--data_dir", "/data/x", "--batchsize", "4"])
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(cmd, str(tmp_path), tiny, runner)


def test_a_command_that_exits_non_zero_fails_the_check(tiny, runner, tmp_path):
    cmd = Command("x.md", 1, ["rectrain", "eval", "--checkpoint", "c.pth", "--split", "no_such_split"])
    with pytest.raises(AssertionError, match="exit status 2"):
        check_command(cmd, str(tmp_path), tiny, runner)


def test_a_program_without_a_rule_fails_the_check(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="no rule for `frobnicate`"):
        check_command(Command("x.md", 1, ["frobnicate", "--fast"]), str(tmp_path), None, None)


def test_a_multi_node_command_with_a_bad_training_value_fails_the_check(tiny, runner, tmp_path):
    argv = "torchrun --nnodes=2 --nproc_per_node=8 -m rectrain train --data_dir /d --target_size 100".split()
    with pytest.raises(UserError, match="multiple of 32"):
        check_command(Command("x.md", 1, argv), str(tmp_path), tiny, runner)
