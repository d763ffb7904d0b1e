"""Mutation testing of the numerical and run-state code with mutmut (``make mutate``; not in CI).

Each target is one source file mutated against the few test files that cover it, in its own
scratch copy of the repository under ``.mutate/<target>/`` (mutmut keeps one configuration and
one ``mutants/`` folder per working directory). The copy is laid anew on every run, so the
current source is mutated. mutmut runs, for each mutant, only the selected tests that executed
the mutated function, and stops at the first failure.

    python scripts/mutate.py                 # every target
    python scripts/mutate.py topk lock       # some targets
    python scripts/mutate.py --list          # the targets, their files and tests
    python scripts/mutate.py --report        # the kill table of the last runs, and the survivors

``--children N`` sets mutmut's parallel workers (default 2). The
table it prints is the one docs/testing.md records.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".mutate"

#: mutmut exit codes (mutmut.stats.status_by_exit_code) folded into four outcomes
KILLED = {1, 3, 37}
TIMEOUT = {36, -24, 24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


@dataclass
class Target:
    """One source file, the tests run against its mutants, and optionally which of its
    functions count (mutmut names: ``f`` or ``ClassǁMethod``; ``lines``: also the mutants of
    ``line_functions`` whose changed line matches this regular expression; ``deselect``: tests
    of ``tests`` left out, slow ones whose ground the others cover; ``confirm``: slower tests
    run, with ``tests``, only on the mutants that survive ``tests``: a second stage in its own
    copy, ``.mutate/<target>-confirm/``)."""

    source: str
    tests: List[str]
    deselect: List[str] = field(default_factory=list)
    confirm: List[str] = field(default_factory=list)
    functions: List[str] = field(default_factory=list)
    line_functions: List[str] = field(default_factory=list)
    lines: str = ""

    @property
    def module(self) -> str:
        return self.source[:-3].replace("/", ".")

    def globs(self) -> List[str]:
        return [f"{self.module}.x{_mangle(f)}__mutmut_*" for f in self.functions]


def _mangle(function: str) -> str:
    """mutmut's name of a function: ``f`` -> ``_f``, ``Cls.meth`` -> ``ǁClsǁmeth`` (after the ``x``)."""
    if "." in function:
        cls, meth = function.split(".")
        return f"ǁ{cls}ǁ{meth}"
    return f"_{function}"


#: the window tests: the fast graph-op, path and gate tests and the small zoo nets per mutant;
#: the generated nets and the bigger zoo nets (2-9 s each) only on the survivors
_WINDOW_TESTS = [
    "tests/test_mirror_graph.py::test_every_relu_family_unit_and_graph_op_matches_oracle",
    "tests/test_mirror_graph.py::test_windowed_path_is_used_and_boxes_are_the_rf_boxes",
    "tests/test_mirror_graph.py::test_se_gate_layers_take_the_full_path_with_a_local_crop_box",
    "tests/test_mirror_graph.py::test_zoo_matches_oracle_and_windowed_equals_full[squeezenet]",
    "tests/test_projection.py",
    "tests/test_window_paste.py",
    "tests/test_window_layout.py",
    "tests/test_window_masks.py",
    "tests/test_window_ops.py",
    "tests/test_windowable.py",
    "tests/test_generated_window.py::test_regression_chunk_item_read_by_a_conv",
]
_WINDOW_CONFIRM = [
    "tests/test_generated_window.py::test_windowed_equals_full_on_generated_nets",
    "tests/test_mirror_graph.py::test_zoo_matches_oracle_and_windowed_equals_full[resnet18]",
    "tests/test_mirror_graph.py::test_zoo_matches_oracle_and_windowed_equals_full[googlenet]",
    "tests/test_mirror_graph.py::test_zoo_matches_oracle_and_windowed_equals_full[mobilenet_v2]",
]
#: the planning half of mirror/window.py (which nodes are windowed, their cones and boxes) and
#: the backward half (the windowed vector-Jacobian products, gathers and pastes)
_WINDOW_PLAN = ["windowable", "_footprint", "plan_window", "AxisWindow.full", "WindowPlan.box"]
_WINDOW_BACKWARD = ["backward_window", "_window_vjp", "_gather", "_gather_hwc", "unpool_index", "paste",
                    "_off_map_strips", "_valid", "_channels_last", "_origin", "_affine"]

TARGETS: Dict[str, Target] = {
    "window": Target("deconvis/mirror/window.py", _WINDOW_TESTS, confirm=_WINDOW_CONFIRM),
    "window_plan": Target("deconvis/mirror/window.py", _WINDOW_TESTS, confirm=_WINDOW_CONFIRM,
                          functions=_WINDOW_PLAN),
    "window_backward": Target("deconvis/mirror/window.py", _WINDOW_TESTS, confirm=_WINDOW_CONFIRM,
                              functions=_WINDOW_BACKWARD),
    # per mutant: the engine's windows and bookkeeping (tests/test_occlusion_windows.py) and the
    # hand-made nets with the 12 squeeze-excitation variants; the 50 generated nets and ResNet-18
    # only on the survivors (RegNetY, 12 s, checks the same gates as the SE variants: left out)
    "occlusion": Target(
        "deconvis/analysis/occlusion_engine.py", ["tests/test_occlusion_windows.py", "tests/test_occlusion.py"],
        deselect=["tests/test_occlusion.py::test_torchvision_regnet_y_gates_equal_naive",
                  "tests/test_occlusion.py::test_torchvision_resnet18_equals_naive"],
        confirm=["tests/test_occlusion_generated.py::test_occlusion_equals_naive_on_generated_nets",
                 "tests/test_occlusion.py::test_torchvision_resnet18_equals_naive"]),
    "topk": Target("deconvis/mining/topk.py", ["tests/test_mining.py", "tests/test_unitstats.py", "tests/test_rerank.py"]),
    "rerank": Target("deconvis/mining/rerank.py", ["tests/test_rerank.py", "tests/test_mining.py"]),
    "rf_geometry": Target("deconvis/graph/rf_geometry.py", [
        "tests/test_rf.py", "tests/test_layerspec.py", "tests/test_cli_rf.py::test_rf_json",
        "tests/test_cli_rf.py::test_rf_table_and_layer_filter", "tests/test_cli_rf.py::test_rf_torchvision_model_json"],
        # 30 hypothesis stacks and the generated nets only on the survivors; the regular stacks,
        # branches and pads check the same gradient support
        deselect=["tests/test_rf.py::test_random_stacks_match_gradient_support"],
        confirm=["tests/test_rf.py::test_random_stacks_match_gradient_support",
                 "tests/test_generated_rf.py::test_rf_rows_match_gradient_support_on_generated_nets"]),
    # per mutant: the lock's own tests and the run-level lock tests; the rest of test_faults.py
    # (whole runs on damaged folders) only on the survivors
    "lock": Target("deconvis/runs/lock.py", [
        "tests/test_lock.py",
        "tests/test_faults.py::test_second_run_on_a_locked_folder_names_the_holder",
        "tests/test_faults.py::test_stale_lock_of_a_dead_process_is_taken_over",
        "tests/test_faults.py::test_lock_is_held_during_the_run_and_released_on_error",
        "tests/test_faults.py::test_two_concurrent_acquires_one_wins"],
        confirm=["tests/test_faults.py"]),
    # per mutant: the short resume tests; the bitwise comparison with an uninterrupted run (two
    # whole trainings, about 5 s) only on the survivors
    "train_resume": Target(
        "deconvis/training/train.py",
        ["tests/test_train_small.py::test_resume_runs_only_the_unfinished_epochs",
         "tests/test_train_small.py::test_resume_with_other_weight_settings_is_refused",
         "tests/test_train_small.py::test_an_unreadable_train_state_is_named_and_left_alone",
         "tests/test_train_small.py::test_no_resume_starts_the_snapshots_over_in_a_used_folder",
         "tests/test_train_small.py::test_resume_continues_the_global_step_count"],
        confirm=["tests/test_train_small.py::test_train_resume_is_bitwise_equal_to_an_uninterrupted_run"],
        functions=["_resume", "_rng_state", "_set_rng_state", "_Optimisers.state_dict",
                   "_Optimisers.load_state_dict"],
        line_functions=["train"], lines=r"start_epoch|state_path|cfg\.resume|TRAIN_STATE|\"rng\"|\"epoch\": epoch"),
}


def _lay_copy(name: str, target: Target, tests_run: Optional[List[str]] = None) -> Path:
    """A fresh scratch copy ``.mutate/<name>/`` of the package and tests with a [mutmut] section
    for ``target`` (its ``tests``, or ``tests_run``)."""
    wd = WORK / name
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    for d in ("deconvis", "tests"):
        shutil.copytree(ROOT / d, wd / d, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", wd / "pyproject.toml")
    cfg = (ROOT / "setup.cfg").read_text()
    tests = "".join(f"\n    {t}" for t in (tests_run if tests_run is not None else target.tests))
    deselect = "".join(f"\n    --deselect\n    {t}" for t in target.deselect if t not in (tests_run or []))
    cfg += ("\n[mutmut]\nsource_paths = deconvis\n"
            f"only_mutate = {target.source}\n"
            f"pytest_add_cli_args_test_selection ={tests}\n"
            f"pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -m\n    not slow{deselect}\n"
            "process_isolation = forkserver\n"
            # a shared machine runs the mutants far slower than the stats run measured them: wall
            # time limits that only a hung mutant reaches, not a busy one
            "timeout_multiplier = 200\n"
            "timeout_constant = 30\n"
            "use_git_change_detection = false\n")
    (wd / "setup.cfg").write_text(cfg)
    return wd


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the tests must import the mutated copy, not the worktree
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


#: mutmut's command line with its string-literal mutator switched off: it turns every message
#: and format string into "XX...XX", hundreds of mutants that only the exact wording would kill
#: (tests match messages by their key words on purpose); keys and modes are names or constants
#: that the other mutators and the round-trip tests cover
_MUTMUT = ("import sys\n"
           "from mutmut.mutation import mutators\n"
           "mutators.mutation_operators[:] = [op for op in mutators.mutation_operators\n"
           "                                  if op[1] is not mutators.operator_string]\n"
           "from mutmut.__main__ import cli\n"
           "sys.argv[0] = 'mutmut'\n"
           "cli()\n")


def _mutmut(wd: Path, args: Sequence[str], children: int) -> None:
    cmd = [sys.executable, "-c", _MUTMUT, "run", "--max-children", str(children), *args]
    print("+ mutmut run", " ".join(cmd[4:]), f"(in {wd.relative_to(ROOT)})", flush=True)
    subprocess.run(cmd, cwd=wd, env=_env(), check=True)


def _meta(wd: Path, target: Target) -> Dict[str, Optional[int]]:
    path = wd / "mutants" / (target.source + ".meta")
    return json.loads(path.read_text())["exit_code_by_key"]


def _diffs(wd: Path, names: Sequence[str]) -> Dict[str, str]:
    """mutmut's diff of each mutant (original -> mutated function)."""
    code = ("import json,sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
            "names=json.load(sys.stdin)\nprint(json.dumps({n: get_diff_for_mutant(n) for n in names}))\n")
    for attempt in range(5):  # a running mutmut rewrites its files now and then: read again
        out = subprocess.run([sys.executable, "-c", code], cwd=wd, env=_env(), input=json.dumps(list(names)),
                             capture_output=True, text=True)
        if out.returncode == 0:
            return json.loads(out.stdout)
        time.sleep(1 + attempt)
    raise RuntimeError(f"mutmut could not show the diffs in {wd}:\n{out.stderr[-2000:]}")


def _selected(wd: Path, target: Target) -> List[str]:
    """The mutant names that count for ``target`` (all of the file when it names no functions)."""
    keys = list(_meta(wd, target))
    if not target.functions and not target.line_functions:
        return keys
    chosen = [k for k in keys if any(fnmatch.fnmatch(k, g) for g in target.globs())]
    pattern = re.compile(target.lines)
    for f in target.line_functions:
        prefix = f"{target.module}.x{_mangle(f)}__mutmut_"
        names = [k for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit()]
        for n, diff in _diffs(wd, names).items():
            if _touches(diff, pattern):
                chosen.append(n)
    return chosen


def _touches(diff: str, pattern: "re.Pattern[str]", reach: int = 3) -> bool:
    """Whether a mutant's change touches ``pattern``: the pattern's matches differ between the
    old and the new lines, or a changed span lies within ``reach`` characters of a match (a
    mutation elsewhere on a long line that happens to mention the pattern does not count)."""
    lines = diff.splitlines()
    old = "\n".join(l[1:] for l in lines if l.startswith("-") and not l.startswith("---"))
    new = "\n".join(l[1:] for l in lines if l.startswith("+") and not l.startswith("+++"))
    spans = [m.span() for m in pattern.finditer(old)]
    if [m.group() for m in pattern.finditer(new)] != [old[a:b] for a, b in spans]:
        return True
    ops = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    return any(i1 <= b + reach and a - reach <= i2 for tag, i1, i2, _, _ in ops if tag != "equal" for a, b in spans)


def run(name: str, children: int, only: Sequence[str] = ()) -> None:
    """Mutate ``name``'s file in a fresh copy and run the mutants that count for it, then the
    confirm stage on the survivors (``only``: just the mutants whose mutmut name matches one of
    these globs, e.g. ``*ǁ_windowed__mutmut_*`` for a method, ``*x_paste__mutmut_*`` for a
    function; no confirm stage)."""
    target = TARGETS[name]
    if only:  # in a copy of its own, so that the last full run's results stay
        _mutmut(_lay_copy(f"{name}-only", target), list(only), children)
        return
    wd = _lay_copy(name, target)
    _mutmut(wd, target.globs(), children)  # generates every mutant of the file, runs those of the named functions
    selected = _selected(wd, target)
    if target.line_functions:  # then the mutants of line_functions on the matching lines (naming
        # them on a target without functions would make mutmut run every mutant a second time)
        extra = [n for n in selected if not any(fnmatch.fnmatch(n, g) for g in target.globs())]
        if extra:
            _mutmut(wd, extra, children)
    confirm(name, children)


def confirm(name: str, children: int) -> None:
    """Second stage: the survivors of ``name``'s last run against its ``confirm`` tests too."""
    target = TARGETS[name]
    if not target.confirm:
        return
    codes = _meta(WORK / name, target)
    survivors = [n for n in _selected(WORK / name, target) if codes.get(n) in SURVIVED]
    if survivors:
        _mutmut(_lay_copy(f"{name}-confirm", target, target.tests + target.confirm), survivors, children)


def report(names: Sequence[str], suffix: str = "") -> int:
    """Print the kill table (and each survivor's diff) of the last runs (``suffix`` "-only": of
    the last ``--only`` runs); 1 when one is missing."""
    rows, missing = [], []
    for name in names:
        target, wd = TARGETS[name], WORK / f"{name}{suffix}"
        if not (wd / "mutants" / (target.source + ".meta")).exists():
            missing.append(name)
            continue
        codes = _meta(wd, target)
        sel = _selected(wd, target)
        outcome = {n: codes.get(n) for n in sel}
        second = WORK / f"{name}{suffix}-confirm" / "mutants" / (target.source + ".meta")
        late: List[str] = []  # survivors of the quick tests killed by the confirm stage
        if target.confirm and second.exists():
            codes2 = json.loads(second.read_text())["exit_code_by_key"]
            late = [n for n, c in outcome.items() if c in SURVIVED and codes2.get(n) in KILLED | TIMEOUT]
            outcome.update({n: codes2[n] for n in late})
        killed = [n for n, c in outcome.items() if c in KILLED]
        timeout = [n for n, c in outcome.items() if c in TIMEOUT]
        survived = sorted((n for n, c in outcome.items() if c in SURVIVED), key=_order)
        untested = sorted((n for n, c in outcome.items() if c in NO_TESTS), key=_order)
        other = [n for n, c in outcome.items() if n not in set(killed + timeout + survived + untested)]  # not run yet
        total = len(sel)
        tried = total - len(other)
        rate = 100.0 * (len(killed) + len(timeout)) / tried if tried else 0.0
        secs = f"{_selection_seconds(wd):.1f}"
        if target.confirm and second.exists():
            secs += f" / {_selection_seconds(WORK / f'{name}{suffix}-confirm'):.1f}"
        rows.append((name, target.source, total, len(killed), len(late), len(timeout), len(survived),
                     len(untested), len(other), rate, secs))
        if survived or untested:
            print(f"\n## {name}: survivors and mutants no selected test runs")
            for n, d in _diffs(wd, survived + untested).items():
                tag = "survived" if n in survived else "no test"
                body = [l for l in d.splitlines() if l[:1] in "+-" and not l.startswith(("+++", "---"))]
                print(f"- {n} ({tag}): " + " | ".join(l.strip() for l in body))
    print("\n| target | file | mutants | killed | of them by confirm | timeout | survived | no test | not run "
          "| kill rate (of those run) | selection s (/ confirm) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]} | {r[8]} | {r[9]:.0f} % "
              f"| {r[10]} |")
    if missing:
        print(f"\nnot run yet: {', '.join(missing)}")
    return 1 if missing else 0


def _selection_seconds(wd: Path) -> float:
    """Seconds the clean run of the tests selected in ``wd`` took (mutmut's stats run: every
    test once; a mutant runs at most these, stopping at the first failure)."""
    stats = wd / "mutants" / "mutmut-stats.json"
    if not stats.exists():
        return float("nan")
    return sum(json.loads(stats.read_text())["duration_by_test"].values())


def _order(name: str) -> tuple:
    base, _, num = name.rpartition("__mutmut_")
    return (base, int(num) if num.isdigit() else 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help=f"targets to run (default: all of {', '.join(TARGETS)})")
    ap.add_argument("--children", type=int, default=2, help="parallel mutmut workers")
    ap.add_argument("--report", action="store_true", help="only print the table of the last runs")
    ap.add_argument("--list", action="store_true", help="list the targets")
    ap.add_argument("--only", nargs="+", default=[], metavar="GLOB",
                    help="run only the mutants whose names match (e.g. '*ǁ_windowed__mutmut_*' for a "
                         "method, '*x_paste__mutmut_*' for a function); the report counts the others "
                         "as not run")
    a = ap.parse_args(argv)
    names = a.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    if a.list:
        for n in names:
            t = TARGETS[n]
            print(f"{n}: {t.source} ({', '.join(t.functions + t.line_functions) or 'every function'})")
            for test in t.tests:
                print(f"    {test}")
            for test in t.deselect:
                print(f"    (not {test})")
            for test in t.confirm:
                print(f"    (survivors only: {test})")
        return 0
    if not a.report:
        for n in names:
            run(n, a.children, a.only)
    return report(names, "-only" if a.only else "")


if __name__ == "__main__":
    sys.exit(main())
