"""The package's structure in figures: modules, import cycles, the largest class and function, and the files one
image crosses on its way from the file to the loss.

    python benchmarks/structure_report.py            # static figures + one traced training step (~20 s on a CPU)
    python benchmarks/structure_report.py --static   # without the trace

Static: every ``rectrain/**.py`` parsed with ``ast`` (nothing imported): modules and folders, imports between
rectrain modules, import cycles (strongly connected components), the longest class and function in lines, the
functions over 60 lines, and attributes of each class first assigned outside ``__init__``.

Traced: a tiny training run (``rectrain train``, one process, batch 2, ``--workers 0`` so that decoding runs in
this process) under ``sys.setprofile``, recording which rectrain files are entered from the dataset's first
``__getitem__`` (the image file is opened there) to the first return of ``augmented_loss`` (the loss): the
distinct files of that path, and how often the path comes back to a file it had left ("re-entries"); and,
set-up included, every file entered from the first listing of the folder (``list_files``) to that loss.
Layout-agnostic: it works on any version of the package, so before/after figures compare.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "rectrain")
LONG_FUNCTION = 60


def modules() -> dict[str, str]:
    """dotted module name -> path, for every .py file of the package."""
    out = {}
    for folder, _dirs, names in os.walk(PKG):
        for n in sorted(names):
            if n.endswith(".py"):
                path = os.path.join(folder, n)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """The rectrain modules ``name`` imports (module level and inside functions)."""
    tree = ast.parse(open(path).read())
    found = set()
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def late_attributes(cls: ast.ClassDef) -> set[str]:
    """``self.x`` first assigned in a method other than ``__init__`` (a dataclass's fields, declared in the class
    body, are set by its ``__init__``)."""
    in_init = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    elsewhere = set()
    for fn in cls.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        target = in_init if fn.name in ("__init__", "__post_init__") else elsewhere
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, (ast.AnnAssign, ast.AugAssign)) else []
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        target.add(e.attr)
    return elsewhere - in_init


def static_report() -> dict:
    mods = modules()
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    classes, functions, late = [], [], []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(open(p).read())):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                classes.append((size, f"{m}.{node.name}"))
                if late_attributes(node):
                    late.append((len(late_attributes(node)), f"{m}.{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((size, f"{m}.{node.name}"))
    folders = {os.path.dirname(p) for p in mods.values()}
    return {"modules": len(mods), "folders": len(folders),
            "top_level_modules": sum(1 for p in mods.values() if os.path.dirname(p) == PKG),
            "import_edges": sum(len(v) for v in graph.values()), "cycles": cycles(graph),
            "largest_class": max(classes), "largest_function": max(functions),
            "functions_over_60_lines": sorted((f for f in functions if f[0] > LONG_FUNCTION), reverse=True),
            "late_set_attributes": sorted(late, reverse=True)}


def trace_one_image() -> dict:
    """Files entered from the dataset's first __getitem__ to the first return of augmented_loss."""
    sys.path.insert(0, ROOT)
    from rectrain.cli import main
    seq: list[str] = []
    setup: set[str] = set()
    state = {"on": False, "listed": False, "done": False}

    def profile(frame, event, arg):
        if state["done"]:
            return
        f = frame.f_code.co_filename
        if not f.startswith(PKG):
            return
        name = frame.f_code.co_name
        rel = os.path.relpath(f, ROOT)
        state["listed"] = state["listed"] or name == "list_files"
        if state["listed"] and event == "call":
            setup.add(rel)
        if event == "call" and name == "__getitem__" and not state["on"]:
            state["on"] = True
        if state["on"] and event == "call" and (not seq or seq[-1] != rel):
            seq.append(rel)
        if state["on"] and event == "return" and name == "augmented_loss":
            state["done"] = True

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        assert main(["synth", "--out", data, "--classes", "2", "--train_per_class", "8", "--val_per_class", "0",
                     "--workers", "0"]) == 0
        sys.setprofile(profile)
        try:
            code = main(["train", "--data_dir", data, "--output", os.path.join(tmp, "runs"), "--arch", "resnet18",
                         "--width", "8", "--target_size", "32", "--batch_size", "2", "--workers", "0", "--device",
                         "cpu", "--max_steps", "1", "--epochs", "1", "--progress", "off"])
        finally:
            sys.setprofile(None)
        assert code == 0, code
    visits = Counter(seq)
    return {"files": sorted(visits), "re_entries": {f: n - 1 for f, n in visits.most_common() if n > 1},
            "path": seq, "from_listing": sorted(setup)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--static", action="store_true", help="skip the traced training step")
    p.add_argument("--path", action="store_true", help="also print the traced path file by file")
    args = p.parse_args()
    s = static_report()
    print(f"modules: {s['modules']} in {s['folders']} folder(s), {s['top_level_modules']} at the top of rectrain/")
    print(f"imports between rectrain modules: {s['import_edges']}; import cycles: {len(s['cycles'])}"
          + "".join(f"\n  cycle: {' <-> '.join(c)}" for c in s["cycles"]))
    print(f"largest class: {s['largest_class'][1]} ({s['largest_class'][0]} lines); largest function: "
          f"{s['largest_function'][1]} ({s['largest_function'][0]} lines)")
    print(f"functions over {LONG_FUNCTION} lines: {len(s['functions_over_60_lines'])}"
          + "".join(f"\n  {n} lines: {f}" for n, f in s["functions_over_60_lines"]))
    print("classes with attributes first set outside __init__: "
          + (", ".join(f"{f} ({n})" for n, f in s["late_set_attributes"]) or "none"))
    if not args.static:
        t = trace_one_image()
        print(f"one image, file to loss: {len(t['files'])} files, {sum(t['re_entries'].values())} re-entries"
              + "".join(f"\n  {f}: re-entered {n}x" for f, n in t["re_entries"].items()))
        print("  files: " + ", ".join(t["files"]))
        print(f"from the folder's listing to the first loss (set-up included): {len(t['from_listing'])} files")
        if args.path:
            print("  path: " + " -> ".join(t["path"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
