"""Mutation testing of the formula-heavy modules: which formulas do the fast tests not pin?

Runs mutmut 3 (``pip install -e .[dev]`` installs it) on the named modules against the fast tests most
relevant to them, prints a per-module table on stderr and ends with one JSON line on stdout::

    python benchmarks/mutation.py                                  # the default modules below
    python benchmarks/mutation.py --paths invdefend/risk.py --show-survivors
    python benchmarks/mutation.py --paths invdefend/defense/ --max-children 2
    python benchmarks/mutation.py --sample 0.1                     # a seeded 10 % sample: an estimate

This is a benchmark, not a test: CI does not run it and pytest does not collect it.

**Modules.** By default ``invdefend/risk.py``, ``invdefend/spectral.py``, ``invdefend/allocation.py``,
``invdefend/noise.py``, ``invdefend/placements/`` and ``invdefend/defense/``; ``--paths`` replaces the list.
A path that does not exist (yet) is skipped with a note on stderr. Only functions and methods are mutated
(mutmut 3 does not mutate module-level statements such as constants).

**Tests.** The ``[mutmut]`` section of ``setup.cfg`` selects them: ``tests/core``, ``tests/defense`` and
``tests/reliability`` with ``-m "not slow"``, minus the end-to-end plumbing tests (demo run, CLI,
TensorBoard logging, soak smoke: they check no formula and cost a third of the selection's time) and two
spectral tests whose LeNet set-up or call alone takes 25-45 s. mutmut first runs that selection once with
every function instrumented, records which tests reach which function, and then runs each mutant only
against the tests that reach its function (``-x``: the first failure kills it). Every test run gets
``OMP_NUM_THREADS=1`` (and one thread for MKL/OpenBLAS); ``--max-children`` (default 2) mutants run in
parallel.

**Time.** Surviving mutants dominate it: each reruns every test reaching its function, about 40 s of tests
for a function of risk.py that every defense test reaches. ``--paths invdefend/risk.py`` (328 mutants) took
23 min on 2 shared cores. The default modules hold about 4,000 mutants, i.e. hours: run them one module at
a time; ``--keep`` reruns reuse mutmut's verdicts for functions whose source did not change. ``--max-stack-depth
N`` (mutmut's ``max_stack_depth``) maps a function only to the tests that reach it through fewer than ``N``
frames of ``invdefend`` code: risk.py at ``N = 3`` took 13 min, and 5 of its mutants killed only through
deeper calls survived; a mutant that no test then reaches counts as a survivor, so the score is a lower
bound. Off by default. (mutmut 3.8 crashes with it on generated frames such as a dataclass ``__init__``;
this script installs a fixed copy of its frame-counting hook.)

**Where it runs.** mutmut 3 copies ``source_paths`` (``invdefend/``), ``tests/``, ``setup.cfg`` and
``pyproject.toml`` into ``mutants/`` (git-ignored) and runs pytest there with ``mutants/`` first on
``sys.path``. It does not read ``package_dir``, so this script first copies each subpackage that
``setup.cfg`` maps from elsewhere (``invdefend.integrations = integrations``) to its place under
``mutants/invdefend/`` (not mutated); otherwise a non-editable install would not find it there and an
editable one would import the unmutated original from the work tree. Each run starts from an empty
``mutants/`` unless ``--keep`` (then mutmut reuses results of functions whose source did not change).

**Counting.** mutmut's outcome of each mutant is mapped as follows:

* ``killed`` — a selected test failed;
* ``survived`` — the tests reaching the mutated function passed. **Mutants that no selected test reaches
  (mutmut's "no tests") count as survivors** (they are also reported alone as ``no_tests``);
* ``timeout``, ``suspicious`` (mutmut could not tell) and ``crashed`` (mutmut's "segfault": the test
  process died by a signal, which includes the hard kill after a CPU-time limit) are in the denominator but
  not counted as killed;
* ``skipped``, ``caught by type check`` (no type checker is configured) and ``not checked`` (an interrupted
  run) are left out of the score and reported alone.

``mutation_score = killed / (killed + survived + timeout + suspicious + crashed)``; ``total`` counts every
mutant of the named modules.

**Excluded: error-message mutants.** Mutating the text of an error or warning message tells nothing about
the formulas, so mutants are not generated for (a) string literals, including f-strings and the expressions
inside them, anywhere inside a ``raise`` statement or inside the arguments of a ``warnings.warn(...)`` /
``warn(...)`` call, and (b) the argument-removal mutants (argument → ``None`` or dropped) of the exception
call right after ``raise`` or of that ``warn`` call, when the argument they change is a string literal. This
is done by a subclass of mutmut's mutation visitor (mutmut itself only offers line-based ``# pragma: no
mutate`` and ``do_not_mutate_patterns``, which would also exclude the code on those lines). No other code is
excluded: conditions, the exception class, ``stacklevel=`` and the warning category are still mutated. The
number of mutants excluded this way is reported per module (``message_mutants_excluded``).

**Sampling (``--sample FRACTION``, ``--sample-seed S``).** A full run of the default modules takes hours on
2 cores; ``--sample 0.1`` estimates the score from a random tenth of the mutants instead. The script first
lets mutmut generate every mutant (the generation step of ``mutmut run``, in a child process of its own, with
the message exclusion above), reads every mutant's name from ``mutants/<file>.meta``, then draws, per module
(each ``.py`` file is a module here, a stratum), ``max(1, round(FRACTION · N_h))`` of its ``N_h`` mutants
uniformly without replacement, and runs ``mutmut run <those names>`` (only the tests reaching a sampled
mutant's function run). The draw is ``random.Random`` seeded by ``--sample-seed`` (default 0) and the file
path: it is reproducible, and a module's sample does not depend on which other modules are named. The drawn
names are saved in ``mutants/mutation-sample.json``. mutmut's stats run (every selected test once,
instrumented) is a fixed cost of a few minutes; the rest scales with the fraction: ``--sample 0.1`` on the
default modules (421 of 4,205 mutants) took 40 min on 2 cores (0.19 mutants/s). The counts (``killed``,
``survived``, ...) then cover the sampled mutants only; ``total`` still counts every mutant and
``sampled_mutants`` the sampled ones; the JSON line also carries ``"sampled": true``, ``sample_fraction``,
``sample_seed``, ``mutation_score_ci95`` and ``score_method``, and each module's row its own ``sampled``,
``mutation_score`` and ``mutation_score_ci95``; ``per_path`` combines the files of each ``--paths`` entry (a
package) the same way as the overall score. Estimates, with 95 % intervals:

* per module: ``p_h = killed / scored`` over its sampled mutants (``scored``: the score's denominator
  above), with the Wilson score interval (no finite-population correction, so slightly conservative);
* overall (and per ``--paths`` entry): the rounding and the "at least 1" make the sampled fraction differ
  between modules, so the pooled sample is not self-weighting and is not simply pooled. ``mutation_score``
  is the stratified estimate ``p = Σ W_h p_h`` with ``W_h = N_h / Σ N_h`` (mutant-count weights over the
  modules that have a scored sampled mutant), and its interval is the Wilson interval for ``p`` at the
  effective sample size ``n_eff = p (1 - p) / V``, ``V = Σ W_h² p_h (1 - p_h) / n_h``, capped at the number
  ``n`` of scored sampled mutants (``n_eff = n`` when ``V = 0``). When every module is sampled at the same
  fraction this is exactly the Wilson interval on the pooled sample (``p`` is then the pooled ratio and the
  cap applies), i.e. the stratification gain is not claimed. ``sample_pooled_score`` gives the plain pooled
  ratio for comparison.

A survivor of the sample is a real survivor (each is listed, ``--show-survivors`` prints its diff); the
survivors outside the sample are not known. Without ``--sample`` nothing changes (the JSON line says
``"sampled": false``).
"""

from __future__ import annotations

import argparse
import configparser
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATHS = [
    "invdefend/risk.py",
    "invdefend/spectral.py",
    "invdefend/allocation.py",
    "invdefend/noise.py",
    "invdefend/placements/",
    "invdefend/defense/",
]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
EXCLUDED_SUFFIX = ".message-mutants-excluded.json"
SAMPLE_FILE = "mutation-sample.json"  # under mutants/
Z95 = 1.959963984540054  # two-sided 95 % normal quantile

# mutmut exit-code status -> our bucket (see the module docstring).
BUCKET = {
    "killed": "killed",
    "survived": "survived",
    "no tests": "survived",
    "timeout": "timeout",
    "suspicious": "suspicious",
    "segfault": "crashed",
    "skipped": "skipped",
    "caught by type check": "type_checked",
    "check was interrupted by user": "not_checked",
    "not checked": "not_checked",
}
COUNTS = ["killed", "survived", "no_tests", "timeout", "suspicious", "crashed", "skipped", "type_checked",
          "not_checked"]


def note(msg: str) -> None:
    print(f"mutation.py: {msg}", file=sys.stderr, flush=True)


# -- the child process: mutmut with the message-string exclusion ---------------------------------------------
def _install_message_exclusion() -> None:
    """Make mutmut skip error/warning-message string mutants (see the module docstring)."""
    import libcst as cst
    from mutmut.mutation import file_mutation

    base = file_mutation.MutationVisitor

    def is_warn_call(node: cst.CSTNode) -> bool:
        if not isinstance(node, cst.Call):
            return False
        f = node.func
        if isinstance(f, cst.Name):
            return f.value == "warn"
        return (isinstance(f, cst.Attribute) and f.attr.value == "warn" and isinstance(f.value, cst.Name)
                and f.value.value == "warnings")

    def only_message_args_changed(orig: cst.Call, mut: cst.CSTNode) -> bool:
        if not isinstance(mut, cst.Call) or not orig.func.deep_equals(mut.func):
            return False
        a, b = list(orig.args), list(mut.args)
        if len(a) == len(b):
            changed = [i for i in range(len(a)) if not a[i].deep_equals(b[i])]
            return bool(changed) and all(isinstance(a[i].value, cst.BaseString) for i in changed)
        if len(a) == len(b) + 1:
            for i in range(len(a)):
                rest = a[:i] + a[i + 1:]
                if all(x.deep_equals(y) for x, y in zip(rest, b)):
                    return isinstance(a[i].value, cst.BaseString)
        return False

    class MessageAwareVisitor(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._message_depth = 0
            self._message_calls: set[int] = set()  # id() of the raise's exception call and of warn calls
            self.message_mutants_excluded = 0

        def _count_would_be(self, node: cst.CSTNode) -> None:
            stack = [node]
            while stack:
                n = stack.pop()
                if self._skip_node_and_children(n):
                    continue
                if self._should_mutate_node(n):
                    for t, operator in self._operators:
                        if isinstance(n, t):
                            self.message_mutants_excluded += sum(1 for _ in operator(n))
                stack.extend(n.children)

        def on_visit(self, node: cst.CSTNode) -> bool:
            if isinstance(node, cst.Raise):
                self._message_depth += 1
                if isinstance(node.exc, cst.Call):
                    self._message_calls.add(id(node.exc))
            elif is_warn_call(node):
                self._message_depth += 1
                self._message_calls.add(id(node))
            elif self._message_depth and isinstance(node, cst.BaseString):
                self._count_would_be(node)
                return False  # neither this string nor anything inside it (f-string expressions) is mutated
            return super().on_visit(node)

        def on_leave(self, original_node: cst.CSTNode) -> None:
            if isinstance(original_node, cst.Raise) or is_warn_call(original_node):
                self._message_depth -= 1
            super().on_leave(original_node)

        def _create_mutations(self, node: cst.CSTNode) -> None:
            if id(node) not in self._message_calls:
                return super()._create_mutations(node)
            before = len(self.mutations)
            super()._create_mutations(node)
            kept = self.mutations[:before]
            for mutation in self.mutations[before:]:
                if mutation.original_node is node and only_message_args_changed(node, mutation.mutated_node):
                    self.message_mutants_excluded += 1
                else:
                    kept.append(mutation)
            self.mutations[:] = kept

    original_create = file_mutation.create_mutations

    def create_mutations(filename, code, *args, **kwargs):
        visitors: list = []

        class Recording(MessageAwareVisitor):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                visitors.append(self)

        file_mutation.MutationVisitor = Recording
        try:
            result = original_create(filename, code, *args, **kwargs)
        finally:
            file_mutation.MutationVisitor = MessageAwareVisitor
        excluded = sum(v.message_mutants_excluded for v in visitors)
        out = Path("mutants") / (str(filename) + EXCLUDED_SUFFIX)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"message_mutants_excluded": excluded}))
        return result

    file_mutation.MutationVisitor = MessageAwareVisitor
    file_mutation.create_mutations = create_mutations


def _install_stack_depth_fix() -> None:
    """mutmut 3.8's ``max_stack_depth`` resolves the file of every frame with ``strict=True``, which raises on
    frames of generated code (a dataclass ``__init__`` is ``<string>``) and fails the stats run. Same rule,
    with such frames skipped (they are not ``invdefend`` code)."""
    import inspect

    from mutmut import stats
    from mutmut.configuration import config
    from mutmut.mutation import trampoline
    from mutmut.state import state

    def record_trampoline_hit(name: str, caller: str | None = None) -> None:
        cfg = config()
        if cfg.max_stack_depth != -1:
            f = inspect.currentframe()
            c = cfg.max_stack_depth
            while c and f:
                filename = f.f_code.co_filename
                f = f.f_back
                if "pytest" in filename or "hammett" in filename or "unittest" in filename:
                    break
                if filename.startswith("<"):
                    continue
                file_path = Path(filename).resolve()
                if any(path in file_path.parents for path in cfg.resolved_mutated_source_paths):
                    c -= 1
            if not c:
                return
        state()._stats.add(name)
        if caller is not None and cfg.track_dependencies:
            state().function_dependencies[name].add(caller)

    stats.record_trampoline_hit = record_trampoline_hit
    trampoline.record_trampoline_hit = record_trampoline_hit


def generate_mutants(max_children: int) -> None:
    """Only the mutant-generation step of ``mutmut run`` (copy the sources to ``mutants/``, write every mutant
    and its ``.meta``): the names are then known before any test runs. A later ``mutmut run`` finds the mutated
    files newer than their sources and reuses them."""
    from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, set_mutant_under_test,
                                 setup_source_paths, store_lines_covered_by_tests)

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    setup_source_paths()
    store_lines_covered_by_tests()
    stats = create_mutants(max_children)
    note(f"generated mutants: {stats.mutated} files mutated, {stats.ignored} ignored, "
         f"{stats.unmodified} unmodified")


def child_main(only_mutate: list[str], max_children: int, max_stack_depth: int, generate_only: bool = False,
               names_file: str | None = None) -> int:
    """Run ``mutmut run`` in this process with ``only_mutate`` (and ``max_stack_depth``) replaced (cwd: the
    repository root); only on the mutants named in ``names_file`` (a JSON list) if given, or only the
    generation step if ``generate_only``."""
    os.environ.update(THREAD_ENV)
    from mutmut.configuration import config

    cfg = config()
    if not cfg.pytest_add_cli_args_test_selection:
        note("setup.cfg has no [mutmut] test selection; refusing to run the whole test suite")
        return 2
    cfg.only_mutate = only_mutate
    cfg.max_stack_depth = max_stack_depth
    if max_stack_depth != -1:
        _install_stack_depth_fix()
    _install_message_exclusion()
    if generate_only:
        generate_mutants(max_children)
        return 0
    from mutmut.__main__ import cli

    names = json.loads(Path(names_file).read_text()) if names_file else []
    try:
        cli.main(["run", "--max-children", str(max_children), *names], prog_name="mutmut", standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


# -- the parent process ----------------------------------------------------------------------------------------
def mutmut_source_paths() -> list[str]:
    cp = configparser.RawConfigParser()
    cp.read(ROOT / "setup.cfg")
    raw = cp.get("mutmut", "source_paths", fallback="") or cp.get("mutmut", "paths_to_mutate", fallback="")
    return [p.strip().rstrip("/") for p in raw.split("\n") if p.strip()]


def mirror_package_dir(source_paths: list[str]) -> list[str]:
    """Copy the subpackages that setup.cfg maps from elsewhere into their place under ``mutants/``."""
    cp = configparser.RawConfigParser()
    cp.read(ROOT / "setup.cfg")
    raw = cp.get("options", "package_dir", fallback="")
    copied = []
    for line in raw.split("\n"):
        if "=" not in line:
            continue
        package, directory = (x.strip() for x in line.split("=", 1))
        if not package or not directory:  # "= src": a root mapping, not a subpackage
            continue
        target = Path(*package.split("."))
        if str(target.parts[0]) not in source_paths or not (ROOT / directory).is_dir():
            continue
        dest = ROOT / "mutants" / target
        shutil.copytree(ROOT / directory, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        copied.append(f"{directory}/ -> mutants/{target}/")
    return copied


def module_files(path: str) -> list[str]:
    p = ROOT / path
    if p.is_file():
        return [path.replace(os.sep, "/")]
    return sorted(str(f.relative_to(ROOT)).replace(os.sep, "/") for f in p.rglob("*.py")
                  if "__pycache__" not in f.parts)


def mutant_names(f: str) -> list[str]:
    """Every generated mutant of ``f`` (from mutmut's ``mutants/<file>.meta``)."""
    meta = ROOT / "mutants" / (f + ".meta")
    return sorted(json.loads(meta.read_text())["exit_code_by_key"]) if meta.exists() else []


def draw_sample(files: list[str], fraction: float, seed: int) -> dict[str, list[str]]:
    """Per file, ``max(1, round(fraction · N))`` of its ``N`` mutants, uniformly without replacement; the
    generator is seeded by ``seed`` and the file path (see the module docstring)."""
    sample = {}
    for f in files:
        names = mutant_names(f)
        if not names:
            continue
        k = min(len(names), max(1, round(fraction * len(names))))
        sample[f] = sorted(random.Random(f"{seed}:{f}").sample(names, k))
    return sample


def collect(files: list[str], sample: dict[str, list[str]] | None = None) -> dict[str, dict]:
    """Per-file counts from mutmut's ``mutants/<file>.meta``; with ``sample``, the counts cover the sampled
    mutants only (``total`` still counts every mutant)."""
    from mutmut.stats import status_by_exit_code

    per = {}
    for f in files:
        row = {k: 0 for k in COUNTS}
        row["total"] = 0
        if sample is not None:
            row["sampled"] = 0
        row["survivors"] = []
        meta = ROOT / "mutants" / (f + ".meta")
        if meta.exists():
            codes = json.loads(meta.read_text())["exit_code_by_key"]
            row["total"] = len(codes)
            if sample is not None:
                codes = {name: codes[name] for name in sample.get(f, [])}
                row["sampled"] = len(codes)
            for name, code in sorted(codes.items()):
                status = status_by_exit_code[code]
                bucket = BUCKET.get(status, "suspicious")
                row[bucket] += 1
                if status == "no tests":
                    row["no_tests"] += 1
                if bucket == "survived":
                    row["survivors"].append(name + (" (no tests)" if status == "no tests" else ""))
        excluded = ROOT / "mutants" / (f + EXCLUDED_SUFFIX)
        row["message_mutants_excluded"] = (
            json.loads(excluded.read_text())["message_mutants_excluded"] if excluded.exists() else 0
        )
        row["mutation_score"] = score(row)
        if sample is not None:
            row["mutation_score_ci95"] = wilson(row["killed"], scored(row))
        per[f] = row
    return per


def scored(row: dict) -> int:
    return row["killed"] + row["survived"] + row["timeout"] + row["suspicious"] + row["crashed"]


def score(row: dict) -> float | None:
    denom = scored(row)
    return row["killed"] / denom if denom else None


def wilson_p(p: float, n: float, z: float = Z95) -> list[float]:
    """Wilson score interval for a proportion ``p`` observed on ``n`` (possibly effective) trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def wilson(k: int, n: int) -> list[float] | None:
    return wilson_p(k / n, n) if n else None


def stratified(rows: list[dict]) -> tuple[float | None, list[float] | None]:
    """Mutant-count-weighted combination of per-module sample scores and its 95 % interval (Wilson at the
    Kish effective sample size, capped at the scored sample size; see the module docstring)."""
    rows = [r for r in rows if scored(r)]
    if not rows:
        return None, None
    weight = sum(r["total"] for r in rows)
    p = sum(r["total"] / weight * score(r) for r in rows)
    var = sum((r["total"] / weight) ** 2 * score(r) * (1 - score(r)) / scored(r) for r in rows)
    n = sum(scored(r) for r in rows)
    n_eff = min(n, p * (1 - p) / var) if var > 0 else n
    return p, wilson_p(p, n_eff)


def print_table(per: dict[str, dict], totals: dict, extra: dict[str, dict] | None = None) -> None:
    sampled = "sampled" in totals
    cols = ["total", *(["sampled"] if sampled else []), "killed", "survived", "no_tests", "timeout",
            "suspicious", "crashed", "skipped", "not_checked", "message_mutants_excluded"]
    heads = ["mutants", *(["sampled"] if sampled else []), "killed", "survived", "(no tests)", "timeout",
             "suspicious", "crashed", "skipped", "unchecked", "msg-excl"]
    rows = [*per.items(), *(extra or {}).items(), ("TOTAL", totals)]
    width = max(len(name) for name, _ in rows)
    line = (f"{'module':<{width}}  " + "  ".join(f"{h:>10}" for h in heads) + f"  {'score':>7}"
            + (f"  {'95% interval':>15}" if sampled else ""))
    print(line, file=sys.stderr)
    print("-" * len(line), file=sys.stderr)
    for name, row in rows:
        s = row["mutation_score"]
        ci = row.get("mutation_score_ci95")
        print(f"{name:<{width}}  " + "  ".join(f"{row.get(c, ''):>10}" for c in cols)
              + f"  {('%.3f' % s) if s is not None else '—':>7}"
              + (f"  {('[%.3f, %.3f]' % tuple(ci)) if ci else '—':>15}" if sampled else ""), file=sys.stderr)


def show_survivors(per: dict[str, dict]) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    for f, row in per.items():
        for entry in row["survivors"]:
            name = entry.split(" ")[0]
            print(f"\n# {entry}", file=sys.stderr)
            try:
                print(get_diff_for_mutant(name, path=f), file=sys.stderr)
            except Exception as exc:  # a diff is a convenience; the counts stand without it
                print(f"(no diff: {type(exc).__name__}: {exc})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=DEFAULT_PATHS,
                        help="modules (files or package directories) to mutate; default: %(default)s")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (default 2)")
    parser.add_argument("--max-stack-depth", type=int, default=-1,
                        help="map a function only to tests reaching it through fewer than N invdefend frames "
                             "(faster; mutants reached only deeper count as survivors); default -1: off")
    parser.add_argument("--keep", action="store_true",
                        help="reuse mutants/, mutmut's test mapping and cached results instead of starting afresh "
                             "(only with the same options)")
    parser.add_argument("--show-survivors", action="store_true", help="print each survivor's diff on stderr")
    parser.add_argument("--sample", type=float, metavar="FRACTION",
                        help="test only a seeded uniform random sample of this fraction of each module's mutants "
                             "(at least 1 per module) and estimate the score with 95%% intervals; default: all")
    parser.add_argument("--sample-seed", type=int, default=0, metavar="SEED",
                        help="seed of the --sample draw (default 0)")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_names-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args._child:
        return child_main(json.loads(args._child[0]), int(args._child[1]), int(args._child[2]),
                          generate_only=args._generate_only, names_file=args._names_file)
    if args.max_children < 1:
        parser.error("--max-children must be >= 1")
    if args.max_stack_depth == 0 or args.max_stack_depth < -1:
        parser.error("--max-stack-depth must be >= 1 (or -1: off)")
    if args.sample is not None and not 0 < args.sample <= 1:
        parser.error("--sample must lie in (0, 1]")

    start = time.perf_counter()
    paths, patterns = [], []
    for raw in args.paths:
        p = raw.rstrip("/")
        if not (ROOT / p).exists():
            note(f"skipping {raw}: it does not exist (yet)")
            continue
        paths.append(p)
        patterns.append(p + "/*" if (ROOT / p).is_dir() else p)
    if not paths:
        note("none of the paths exist; nothing to mutate")
        return 2
    source_paths = mutmut_source_paths()
    outside = [p for p in paths if Path(p).parts[0] not in source_paths]
    if outside:
        note(f"{outside} lie outside [mutmut] source_paths={source_paths} in setup.cfg")
        return 2

    if not args.keep and (ROOT / "mutants").exists():
        shutil.rmtree(ROOT / "mutants")
    (ROOT / "mutants").mkdir(exist_ok=True)
    for copied in mirror_package_dir(source_paths):
        note(f"mirrored package_dir mapping {copied}")
    env = {**os.environ, **THREAD_ENV}
    child = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(patterns),
             str(args.max_children), str(args.max_stack_depth)]
    files = sorted({f for p in paths for f in module_files(p)})
    sample = None
    extra: list[str] = []
    if args.sample is not None:
        note(f"generating the mutants of {', '.join(paths)}")
        gen = subprocess.run([*child, "--_generate-only"], cwd=ROOT, env=env, stdout=sys.stderr,
                             stderr=sys.stderr)
        if gen.returncode:
            note(f"mutant generation failed with exit code {gen.returncode}")
            return 1
        sample = draw_sample(files, args.sample, args.sample_seed)
        if not sample:
            note("no mutants were generated; nothing to sample")
            return 2
        names_file = ROOT / "mutants" / SAMPLE_FILE
        names_file.write_text(json.dumps({"fraction": args.sample, "seed": args.sample_seed, "mutants": sample},
                                          ensure_ascii=False, indent=1))
        names = sorted(n for ns in sample.values() for n in ns)
        (ROOT / "mutants" / (SAMPLE_FILE + ".names")).write_text(json.dumps(names, ensure_ascii=False))
        extra = ["--_names-file", str(ROOT / "mutants" / (SAMPLE_FILE + ".names"))]
        note(f"sampled {len(names)} of {sum(len(mutant_names(f)) for f in sample)} mutants "
             f"(fraction {args.sample}, seed {args.sample_seed}): "
             + ", ".join(f"{f} {len(ns)}/{len(mutant_names(f))}" for f, ns in sample.items()))
    note(f"mutating {', '.join(paths)} with {args.max_children} children (mutmut output follows)")
    proc = subprocess.run([*child, *extra], cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    seconds = time.perf_counter() - start

    per = collect(files, sample)
    per = {f: row for f, row in per.items() if row["total"] or row["message_mutants_excluded"]}
    keys = [*COUNTS, "total", *(["sampled"] if sample is not None else []), "message_mutants_excluded"]
    totals = {k: sum(row[k] for row in per.values()) for k in keys}
    totals["mutation_score"] = score(totals)
    per_path: dict[str, dict] = {}
    if sample is not None:
        pooled = totals["mutation_score"]
        totals["mutation_score"], totals["mutation_score_ci95"] = stratified(list(per.values()))
        for p in paths:
            rows = [row for f, row in per.items() if f == p or f.startswith(p + "/")]
            if len(rows) > 1:
                agg = {k: sum(row[k] for row in rows) for k in keys}
                agg["mutation_score"], agg["mutation_score_ci95"] = stratified(rows)
                per_path[p + "/"] = agg
    print("", file=sys.stderr)
    print_table(per, totals, per_path)
    if args.show_survivors:
        show_survivors(per)
    if totals["not_checked"]:
        note(f"{totals['not_checked']} mutants were not checked (interrupted run?)")
    if proc.returncode:
        note(f"mutmut exited with {proc.returncode}")
    sampling: dict = {"sampled": False}
    if sample is not None:
        sampling = {
            "sampled": True,
            "sample_fraction": args.sample,
            "sample_seed": args.sample_seed,
            "sampled_mutants": totals["sampled"],
            "mutation_score_ci95": totals["mutation_score_ci95"],
            "score_method": "stratified by module (file): sum_h (N_h/N) killed_h/scored_h; 95% Wilson interval "
                            "at the Kish effective size, capped at the scored sample size",
            "sample_pooled_score": pooled,
        }
    result = {
        "mutation_score": totals["mutation_score"],
        **sampling,
        **{k: totals[k] for k in ["killed", "survived", "no_tests", "timeout", "suspicious", "crashed",
                                  "skipped", "not_checked"]},
        "total": totals["total"],
        "message_mutants_excluded": totals["message_mutants_excluded"],
        **({"per_path": per_path} if sample is not None else {}),
        "per_module": per,
        "paths": paths,
        "max_stack_depth": args.max_stack_depth,
        "seconds": round(seconds, 1),
        "mutmut_exit_code": proc.returncode,
    }
    print(json.dumps(result, ensure_ascii=False))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
