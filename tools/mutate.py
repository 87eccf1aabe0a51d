"""Mutation testing of the manual implementation's math: how many bugs nobody thought of does the
conformance matrix catch? (issue 16; docs/mutation.md)

    python -m tools.mutate --sample 300 --seed 0 --workers 2          # the figure in docs/mutation.md
    python -m tools.mutate --list                                      # every candidate mutant
    python -m tools.mutate --root ~/port --file mypkg/model.py --impl mypkg.model:make_model
    python -m tools.mutate --root examples/numpy_port --file port.py --impl-cmd 'python port.py {case} {out}'

Each mutant is one AST edit of one file: an arithmetic operator swapped (+ -, * /, ** *), `+=` made
`-=` or `=`, a unary minus dropped, a comparison flipped, a numeric constant changed, an `axis=`
moved, a slice bound moved by one, True/False swapped. Lines that only validate input (a `raise`
and the `if` that guards it) are not mutated: the suite feeds valid input, tests/ check the errors; nor
are the lines the coverage contract excludes (`exclude_lines` in the root's .coveragerc, each with its
reason: validation, error messages, accounting).

Per mutant, in a private copy of the tree (the real files are never written), a child process:
    1. runs the matrix (conformance/matrix.py, default variants, float64 and float32), cheap checks
       of every case first, then the optimizer, then memory and training; the first failing
       comparison kills the mutant ("killed"); an exception or timeout is "crashed";
    2. if every comparison passes, asks a strong float64 oracle whether any output changed: the
       manual side's loss, logits, gradients, a few optimizer steps of every optimizer kind the case
       runs and the generated tokens, for every case of the matrix, compared at ZERO tolerance with
       the unmutated code's. Nothing changed: "equivalent"; something did: "missed" (printed with
       file, line and the diff).

An outside implementation: --root is the tree to copy, --file the files to mutate (relative to
--root), and the implementation is named as `python -m conformance` names it: --impl
module:factory (Python, imported from the copied tree) or --impl-cmd 'CMD {case} {out}' (any
program, run in the copied tree; add {steps} to check its optimizer too). Each mutant then runs the
matrix through conformance.external (every configuration; a program's lines cannot be traced, so no
line map), and the oracle compares the implementation's own dumps at zero tolerance. --sides
module:function instead swaps in a drop-in manual side (a conformance.engine.Sides).
"""
from __future__ import annotations

import argparse
import ast
import copy
import difflib
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "manual" / "layers").glob("*.py")
                       if p.name != "__init__.py") + ["manual/model.py", "manual/optim.py"]
VERDICTS = ("killed", "crashed", "equivalent", "missed")
TIMEOUT_S = 900            # per mutant: an infinite loop is a crash


@dataclass
class Mutant:
    file: str              # relative to the root
    line: int
    kind: str              # operator, augassign, assign, unary, compare, constant, axis, slice, bool
    start: tuple           # (line, col) of the replaced source span, 1-based line
    end: tuple
    old: str
    new: str
    stmt_line: int = 0     # first line of the enclosing statement (what coverage records as executed)

    def apply(self, source: str) -> str:
        lines = source.splitlines(keepends=True)
        offs = [0]
        for ln in lines:
            offs.append(offs[-1] + len(ln.encode()))
        data = source.encode()
        a = offs[self.start[0] - 1] + self.start[1]
        b = offs[self.end[0] - 1] + self.end[1]
        return (data[:a] + self.new.encode() + data[b:]).decode()

    def diff(self, source: str) -> str:
        return "".join(difflib.unified_diff(source.splitlines(True), self.apply(source).splitlines(True),
                                            f"a/{self.file}", f"b/{self.file}", n=0))


# -- the mutations ----------------------------------------------------------------------------

_BINOP_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
               ast.FloorDiv: ast.Div}
_CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq}


def _validation_lines(tree) -> set[int]:
    """Lines of `raise` statements and of the `if` tests that only guard a raise."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise):
            out.update(range(node.lineno, node.end_lineno + 1))
        if isinstance(node, ast.If) and node.body and all(isinstance(s, ast.Raise) for s in node.body):
            out.update(range(node.test.lineno, node.test.end_lineno + 1))
    return out


def _docstring_nodes(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _in_function(tree) -> set[int]:
    """ids of the nodes inside a function body (module-level code is configuration, not math)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt))
    return out


def _expr(node) -> str:
    return f"({ast.unparse(node)})"


def _variants(node, parent_kw: str | None):
    """(kind, replacement node or text) for one node."""
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAP:
        new = copy.deepcopy(node)
        new.op = _BINOP_SWAP[type(node.op)]()
        yield "operator", _expr(new)
    elif isinstance(node, ast.AugAssign):
        if type(node.op) in _BINOP_SWAP:
            new = copy.deepcopy(node)
            new.op = _BINOP_SWAP[type(node.op)]()
            yield "augassign", ast.unparse(new)
        yield "assign", ast.unparse(ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and \
            not isinstance(node.operand, ast.Constant):
        yield "unary", _expr(node.operand)
    elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP_SWAP:
        new = copy.deepcopy(node)
        new.ops = [_CMP_SWAP[type(node.ops[0])]()]
        yield "compare", _expr(new)
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        yield "bool", repr(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        if parent_kw == "axis":
            yield "axis", repr(v - 1 if v != 0 else 1)
        elif type(v) is int:
            yield "constant", repr(v + 1)
        else:
            yield "constant", repr(v * 2 if v != 0 else 1.0)
    elif isinstance(node, ast.Slice):
        if node.lower is not None:
            yield "slice", ("lower", f"({ast.unparse(node.lower)}) + 1")
        if node.upper is not None:
            yield "slice", ("upper", f"({ast.unparse(node.upper)}) - 1")


def _coverage_excluded(root: Path, source: str) -> set[int]:
    """Lines that the coverage contract excludes (`exclude_lines` of root/.coveragerc: input validation,
    error messages, accounting, each with its reason there), blocks included. Not mutated: the matrix is
    not meant to reach them, so a mutant there says nothing about its power. No .coveragerc: none."""
    rc = root / ".coveragerc"
    if not rc.is_file():
        return set()
    import coverage
    from coverage.parser import PythonParser
    patterns = coverage.Coverage(config_file=str(rc)).config.exclude_list
    if not patterns:
        return set()
    parser = PythonParser(text=source, exclude="|".join(f"(?:{x})" for x in patterns))
    parser.parse_source()
    return set(parser.excluded)


def mutants_of(root: Path, file: str) -> list[Mutant]:
    source = (root / file).read_text()
    tree = ast.parse(source)
    skip_lines, docs, inside = _validation_lines(tree), _docstring_nodes(tree), _in_function(tree)
    skip_lines |= _coverage_excluded(root, source)
    kw_of = {id(k.value): k.arg for k in ast.walk(tree) if isinstance(k, ast.keyword)}
    stmt_of = {}
    for st in ast.walk(tree):              # innermost statement of every node (walk is outside-in)
        if isinstance(st, ast.stmt):
            for n in ast.walk(st):
                stmt_of[id(n)] = st.lineno
    for st in ast.walk(tree):              # an if / while / for: its test lines belong to its first line
        if isinstance(st, (ast.If, ast.While)):
            for n in ast.walk(st.test):
                stmt_of[id(n)] = st.lineno
        if isinstance(st, ast.For):
            for n in (*ast.walk(st.iter), *ast.walk(st.target)):
                stmt_of[id(n)] = st.lineno
    out = []
    for node in ast.walk(tree):
        if id(node) not in inside or id(node) in docs or not hasattr(node, "lineno"):
            continue
        if node.lineno in skip_lines or isinstance(node, ast.JoinedStr):
            continue
        for kind, new in _variants(node, kw_of.get(id(node))):
            target = node
            if kind == "slice":
                which, new = new
                target = getattr(node, which)
            out.append(Mutant(file, target.lineno, kind, (target.lineno, target.col_offset),
                              (target.end_lineno, target.end_col_offset), ast.get_source_segment(source, target), new,
                              stmt_of.get(id(node), node.lineno)))
    # f-string internals and constants inside format specs carry no math
    return [m for m in out if m.old is not None and not _in_fstring(tree, m)]


def _in_fstring(tree, m: Mutant) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and (node.lineno, node.col_offset) <= m.start and \
                m.end <= (node.end_lineno, node.end_col_offset):
            return True
    return False


def all_mutants(root: Path, files) -> list[Mutant]:
    return [m for f in files for m in mutants_of(root, f)]


# -- the child: one mutant's verdict (runs inside the copied tree) -----------------------------

FAST = ("logits", "loss", "activation", "activation_grad", "param_grad", "accumulate")
STAGES = (FAST, ("optimizer", "generation", "recompute"), ("param_count", "memory", "training"))
ORACLE_STEPS = 3


def _load_sides(spec: str | None):
    from conformance.engine import Sides
    if not spec:
        return Sides.default()
    import importlib
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn or "sides")()


def matrix_cases(variants=None, dtypes=("float64", "float32"), outside=False):
    from conformance.matrix import cases
    return cases("tiny", dtypes, only=variants, outside=outside)


def matrix_verdict(sides_spec=None, variants=None, dtypes=("float64", "float32"), only=None, impl=None) -> dict:
    """Run the matrix stage by stage; the first failing comparison: {"verdict": "killed", "by": ...}.
    `only`: the names of the cases to run (those that execute the mutated line; None: every case).
    `impl`: an Impl (an outside implementation through conformance.external, as `python -m conformance
    --impl / --impl-cmd` runs it), instead of the Sides."""
    from conformance.engine import run_case
    if impl is not None:
        from conformance.external import run_job
        for job in impl.jobs(variants, dtypes):
            if only is None or job.case.name() in only:
                o = run_job(job)
                if not o.passed:
                    c = o.first_failure()
                    return {"verdict": "killed", "by": f"{o.config} " + (f"{c.check} {c.tensor}" if c else o.message)}
        return {"verdict": "survived"}
    sides = _load_sides(sides_spec)
    todo = [c for c in matrix_cases(variants, dtypes) if only is None or c.name() in only]
    for checks in STAGES:
        for case in todo:
            for c in run_case(case, checks, sides):
                if not c.passed:
                    return {"verdict": "killed", "by": f"{c.config} {c.check} {c.tensor}"}
    return {"verdict": "survived"}


class MutateError(RuntimeError):
    """The mutation run cannot start (the unmutated code fails the matrix, or its oracle run broke)."""


@dataclass
class Impl:
    """An outside implementation under mutation: `--impl package.module:factory` (in process) or
    `--impl-cmd 'CMD {case} {out}'` (a program), with `steps` optimizer steps per configuration."""
    impl: str | None = None
    cmd: str | None = None
    steps: int = 3

    def jobs(self, variants=None, dtypes=("float64", "float32"), keep=None) -> list:
        from conformance.external import DEFAULT_TIMEOUT, MatrixJob, wants_steps
        steps = self.steps if (self.impl or wants_steps(self.cmd)) else 0
        return [MatrixJob(case, impl=self.impl, cmd=self.cmd, steps=steps, timeout=DEFAULT_TIMEOUT, keep=keep)
                for case in matrix_cases(variants, dtypes, outside=True)]


def impl_outputs(impl: Impl, variants=None) -> dict:
    """The outside implementation's own tensors on every case (what it dumps: forward and backward, and
    the training run's when it has one), as {name: ndarray} for the zero-tolerance oracle."""
    import numpy as np
    from conformance.external import run_job
    from manual.checkpoint import load_tensors
    out = {}
    with tempfile.TemporaryDirectory(prefix="mutate-oracle-") as keep:
        for job in impl.jobs(variants, keep=keep):
            o = run_job(job)
            out[f"{job.case.name()}.status"] = np.asarray(o.status != "unsupported")
        for f in sorted(Path(keep).rglob("*.safetensors")):
            out.update({f"{f.relative_to(keep)}:{k}": v for k, v in load_tensors(f)[0].items()})
    return out


def oracle_outputs(sides_spec=None, variants=None, impl: Impl | None = None) -> dict:
    """The manual side's outputs on every float64 and float32 case, as {name: ndarray} (0 tolerance);
    an outside implementation's (impl_outputs) when `impl` is given."""
    import numpy as np
    if impl is not None:
        return impl_outputs(impl, variants)
    from conformance import trajectory
    from conformance.engine import init_params, make_batch, trajectory_batches
    import reference

    sides = _load_sides(sides_spec)
    out = {}
    for case in matrix_cases(variants):
        key = case.name()
        kw = dict(case.manual_kwargs)
        if case.flash_block is not None:
            kw["flash_block"] = case.flash_block
        ids, targets = make_batch(case.cfg, case.batch, case.T, case.seed, case.pad)
        for mode in ("none", "blocks"):          # activation recomputation: its own forward path
            extra = {} if mode == "none" else {"recompute": mode}
            m = sides.manual.from_params(case.cfg, init_params(case), **kw, **extra)
            m.zero_grad()
            out[f"{key}.{mode}.loss"] = np.asarray(m.forward(ids, targets))
            out[f"{key}.{mode}.logits"] = np.array(m.logits)
            m.backward()
            out.update({f"{key}.{mode}.grad.{n}": np.array(g) for n, g in m.grads.items()})
            ids2, targets2 = trajectory_batches(case, 2)[1]     # a second backward, no zero_grad: the sum
            m.forward(ids2, targets2)
            m.backward()
            out.update({f"{key}.{mode}.accumulated.{n}": np.array(g) for n, g in m.grads.items()})
        out[f"{key}.tokens"] = np.asarray(sides.manual_generate(m, ids[0, :4], 5, temperature=0.0))
        for kind in case.optimizers:
            # the trajectory's own optimizers (its groups, frozen parameters and resume: trajectory.SETUP);
            # the torch twin make_optimizers also builds is only needed for the resume's state_dict
            hp, clip = trajectory.OPTIMIZERS[kind]
            resume_at = trajectory.SETUP.get(kind, {}).get("resume")
            m = sides.manual.from_params(case.cfg, init_params(case), **kw)
            r = reference.Model.from_params(case.cfg, init_params(case))
            opt, r_opt = trajectory.make_optimizers(sides.manual_optim, m, r, kind)
            if isinstance(clip, (int, float)):
                clip = ("norm", float(clip), 2.0)
            for step, (ids_s, t_s) in enumerate(trajectory_batches(case, ORACLE_STEPS), 1):
                m.zero_grad()
                m.forward(ids_s, t_s)
                m.backward()
                if clip is not None and clip[0] == "value":
                    sides.manual_optim.clip_grad_value_(m.grads, clip[1])
                elif clip is not None:
                    out[f"{key}.{kind}.norm{step}"] = np.asarray(
                        sides.manual_optim.clip_grad_norm_(m.grads, clip[1], norm_type=clip[2],
                                                           error_if_nonfinite=False))
                opt.step()
                if step == resume_at:
                    opt, r_opt = trajectory.resume(sides.manual_optim, m, r, kind, opt, r_opt)
            out.update({f"{key}.{kind}.param.{n}": np.array(p) for n, p in m.params.items()})
            out.update({f"{key}.{kind}.{n}": np.array(t) for n, t in opt.state_dict()[0].items()})
    return out


def line_map(files: list[str], sides_spec=None, variants=None, dtypes=("float64", "float32")) -> dict:
    """{file: {line: [case names that execute it]}} for the files to mutate: each case of the matrix
    run once under coverage.py. A mutant runs only the cases that execute its line (the others
    cannot see it); a line no case executes leaves its mutants to the oracle."""
    import coverage
    from conformance.engine import run_case

    sides = _load_sides(sides_spec)
    paths = {str((Path.cwd() / f).resolve()): f for f in files}
    out: dict = {f: {} for f in files}
    for case in matrix_cases(variants, dtypes):
        # two optimizer steps reach every line the twenty do (the second step has state)
        case.opt_steps, case.gen_tokens = min(case.opt_steps, 2), min(case.gen_tokens, 2)
        cov = coverage.Coverage(data_file=None, include=list(paths), branch=False, config_file=False)
        cov.start()
        try:
            run_case(case, FAST + ("optimizer", "generation", "recompute"), sides=sides)   # memory, training: same code again
        finally:
            cov.stop()
        data = cov.get_data()
        for path in data.measured_files():
            f = paths.get(str(Path(path).resolve()))
            for line in data.lines(path) or []:
                out[f].setdefault(str(line), []).append(case.name())
    return out


def _verdict(args, only=None) -> dict:
    """This tree's verdict (the mutant is already written into it)."""
    import numpy as np
    try:
        impl = _impl_of(args)
        v = matrix_verdict(args.sides, args.variant, tuple(args.dtype), only, impl)
        if v["verdict"] == "survived":
            with np.load(args.oracle_ref, allow_pickle=False) as ref:
                try:
                    mine = oracle_outputs(args.sides, args.variant, impl)
                except Exception as exc:   # the oracle's own runs crash: an observable change
                    mine = {"error": repr(exc)}
                changed = [k for k in ref.files if k not in mine or not np.array_equal(ref[k], mine[k], equal_nan=True)]
            v = {"verdict": "missed", "changed": changed[:5]} if changed else {"verdict": "equivalent"}
    except Exception as exc:
        v = {"verdict": "crashed", "by": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return v


def _impl_of(args) -> Impl | None:
    return Impl(args.impl, args.impl_cmd, args.impl_steps) if (args.impl or args.impl_cmd) else None


def _fresh_imports(tree: Path) -> None:
    """Forget every module loaded from the copied tree, so the next import reads the mutated file
    (torch and NumPy stay loaded: that is the point of a long-lived child)."""
    import importlib
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if f.startswith(str(tree)) or name.split(".")[0] in ("manual", "conformance", "reference"):
            del sys.modules[name]
    importlib.invalidate_caches()


def _child(args) -> int:
    """Inside the copied tree. --oracle-only: write the unmutated outputs. Otherwise serve: for every
    line "run" on stdin (the parent has written the mutant), print one JSON line with the verdict."""
    import numpy as np
    import torch  # noqa: F401  (loaded once, kept across mutants)
    if args.oracle_only:
        impl = _impl_of(args)
        # the unmutated code must pass the matrix, or every verdict below would be meaningless ("killed"
        # by a failure that is not the mutant's)
        v = matrix_verdict(args.sides, args.variant, tuple(args.dtype), None, impl)
        if v["verdict"] != "survived":
            print(json.dumps({"verdict": "baseline", "by": v.get("by", "")}))
            return 3
        # an outside implementation: no line map (a program's lines cannot be traced from here), every case runs
        lines = None if impl else line_map(args.file, args.sides, args.variant, tuple(args.dtype))
        Path(args.oracle_out + ".lines.json").write_text(json.dumps(lines))
        np.savez(args.oracle_out, **oracle_outputs(args.sides, args.variant, impl))
        print(json.dumps({"verdict": "oracle"}))
        return 0
    tree = Path.cwd()
    for line in sys.stdin:
        if not line.startswith("run"):
            break
        only = json.loads(line[3:])          # "run [case names]"
        _fresh_imports(tree)
        print(json.dumps(_verdict(args, only)), flush=True)
    return 0


# -- the parent: copies, workers, the summary ---------------------------------------------------

def _copy_tree(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "out", ".coverage*",
                                                              "*.safetensors", ".ci"))
    return dest


def _child_cmd(tree: Path, extra: list[str]):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(ROOT)]), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    # tools.mutate itself comes from the project (the copied tree may be an outside implementation)
    return [sys.executable, str(ROOT / "tools" / "mutate.py"), "--child", *extra], env


@dataclass
class Matrix:
    """What the child runs per mutant: matrix variants (None: all), dtypes, the Sides factory or an
    outside implementation (Impl), a timeout."""
    variants: list | None = None
    dtypes: tuple = ("float64", "float32")
    sides: str | None = None
    timeout: int = TIMEOUT_S
    impl: Impl | None = None

    def argv(self) -> list[str]:
        out = []
        for v in self.variants or []:
            out += ["--variant", v]
        for d in self.dtypes:
            out += ["--dtype", d]
        if self.impl is not None:
            out += (["--impl", self.impl.impl] if self.impl.impl else ["--impl-cmd", self.impl.cmd])
            out += ["--impl-steps", str(self.impl.steps)]
        return out + (["--sides", self.sides] if self.sides else [])


def run_mutants(mutants: list[Mutant], root: Path = ROOT, workers: int = 2, matrix: Matrix = Matrix(),
                progress=print) -> list[dict]:
    """Every mutant's verdict (a dict: the Mutant's fields, verdict, by / changed, seconds, diff)."""
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        tmp = Path(tmp)
        oracle = tmp / "oracle.npz"
        base = _copy_tree(root, tmp / "base")
        files = sorted({m.file for m in mutants})
        cmd, env = _child_cmd(base, ["--oracle-only", "--oracle-out", str(oracle), *matrix.argv(),
                                     *[a for f in files for a in ("--file", f)]])
        done = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True)
        if done.returncode != 0:
            said = done.stdout.strip().splitlines()[-1:] or [""]
            try:
                why = "the unmutated code fails the matrix: " + json.loads(said[0])["by"]
            except (ValueError, KeyError, TypeError):
                why = f"its run exited with status {done.returncode}: " + done.stderr.strip()[-1500:]
            raise MutateError(f"no mutant was run: {why} (fix that first: python -m conformance ...)")
        lines = json.loads(Path(str(oracle) + ".lines.json").read_text())
        trees = [_copy_tree(root, tmp / f"w{i}") for i in range(workers)]
        children = [None] * workers         # one long-lived child per worker, restarted after a timeout
        free = list(range(workers))
        results: list[dict] = [None] * len(mutants)

        def ask(w, only) -> dict:
            if children[w] is None or children[w].poll() is not None:
                cmd, env = _child_cmd(trees[w], ["--oracle-ref", str(oracle), *matrix.argv()])
                children[w] = subprocess.Popen(cmd, env=env, cwd=trees[w], stdin=subprocess.PIPE,
                                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            child = children[w]
            child.stdin.write("run" + json.dumps(only) + "\n")
            child.stdin.flush()
            deadline = time.monotonic() + matrix.timeout
            while True:
                ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    child.kill()
                    child.wait()
                    return {"verdict": "crashed", "by": f"timeout after {matrix.timeout} s"}
                line = child.stdout.readline()
                if not line:                # the child died (a segfault, an exit in the mutated code)
                    child.wait()
                    return {"verdict": "crashed", "by": f"the child exited with status {child.returncode}"}
                if line.startswith("{"):
                    return json.loads(line)

        def one(i):
            w = free.pop()
            tree, m = trees[w], mutants[i]
            path = tree / m.file
            original = path.read_text()
            try:
                path.write_text(m.apply(original))
                t0 = time.perf_counter()
                only = None if lines is None else lines.get(m.file, {}).get(str(m.stmt_line), [])
                v = ask(w, only)
                v["cases"] = "all" if only is None else len(only)
                v["seconds"] = round(time.perf_counter() - t0, 1)
            finally:
                path.write_text(original)
                free.append(w)
            results[i] = {**asdict(m), **v, "diff": m.diff(original)}
            progress(f"[{sum(r is not None for r in results)}/{len(mutants)}] {m.file}:{m.line}:{m.start[1] + 1} {m.kind} "
                     f"{m.old!r} -> {m.new!r}: {v['verdict']}")

        with ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                list(pool.map(one, range(len(mutants))))
            finally:
                for child in children:
                    if child is not None and child.poll() is None:
                        child.stdin.close()
                        child.wait(timeout=60)
    return results


def summary(results: list[dict]) -> str:
    counts = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    observable = len(results) - counts["equivalent"]
    caught = counts["killed"] + counts["crashed"]
    rate = 100.0 * caught / observable if observable else 100.0
    lines = [f"{len(results)} mutants: " + ", ".join(f"{counts[v]} {v}" for v in VERDICTS) +
             f"; kill rate {rate:.1f}% of the non-equivalent"]
    for r in results:
        if r["verdict"] == "missed":
            lines.append(f"\nMISSED {r['file']}:{r['line']} ({r['kind']}) changes {r.get('changed')}\n{r['diff']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.mutate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the tree to copy and mutate (default: this project)")
    p.add_argument("--file", action="append", help="files to mutate, relative to --root (repeatable; default: "
                                                   "manual/layers/*.py, manual/model.py, manual/optim.py)")
    p.add_argument("--sides", help="module:function returning the conformance.engine.Sides to check "
                                   "(a drop-in manual side; imported from the copied --root)")
    p.add_argument("--impl", metavar="MODULE:FACTORY",
                   help="an outside implementation in Python, checked as `python -m conformance --impl` checks it "
                        "(imported from the copied --root)")
    p.add_argument("--impl-cmd", metavar="'CMD {case} {out}'",
                   help="an outside program, checked as `python -m conformance --impl-cmd` checks it (run in the "
                        "copied --root)")
    p.add_argument("--impl-steps", type=int, default=3,
                   help="optimizer steps per configuration for --impl / --impl-cmd (default 3)")
    p.add_argument("--sample", type=int, help="check N mutants drawn at random (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", help="only mutants whose 'file:line' starts with this")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variant", action="append", help="matrix variants to run (default: all)")
    p.add_argument("--dtype", action="append", choices=("float64", "float32"))
    p.add_argument("--timeout", type=int, default=TIMEOUT_S)
    p.add_argument("--list", action="store_true", help="print the candidate mutants and stop")
    p.add_argument("--json", metavar="PATH", help="write every mutant's verdict")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--oracle-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--oracle-out", help=argparse.SUPPRESS)
    p.add_argument("--oracle-ref", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ["float64", "float32"]
    if args.child:
        return _child(args)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if sum(bool(x) for x in (args.sides, args.impl, args.impl_cmd)) > 1:
        p.error("give one of --sides, --impl, --impl-cmd")
    if args.impl_steps < 0:
        p.error(f"--impl-steps must be >= 0, got {args.impl_steps}")
    root = args.root.resolve()
    files = args.file or DEFAULT_FILES
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        p.error(f"no such file(s) under {root}: {missing}")
    mutants = all_mutants(root, files)
    if args.only:
        mutants = [m for m in mutants if f"{m.file}:{m.line}".startswith(args.only)]
    if args.list:
        for m in mutants:
            print(f"{m.file}:{m.line}:{m.start[1] + 1} {m.kind}: {m.old!r} -> {m.new!r}")
        print(f"{len(mutants)} candidate mutants")
        return 0
    if args.sample is not None and args.sample < len(mutants):
        mutants = sorted(random.Random(args.seed).sample(mutants, args.sample), key=lambda m: (m.file, m.start))
    print(f"{len(mutants)} mutants, {args.workers} workers", flush=True)
    matrix = Matrix(args.variant, tuple(args.dtype), args.sides, args.timeout, _impl_of(args))
    try:
        results = run_mutants(mutants, root, args.workers, matrix, progress=lambda s: print(s, flush=True))
    except MutateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["verdict"] == "missed" for r in results) else 0


if __name__ == "__main__":
    if __package__ in (None, ""):           # run as a script by the parent: import the copied tree first
        sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.exit(main())
