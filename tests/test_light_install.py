"""The apps install light: reading the results store and its statistics needs no torch, diffusers
or accelerate. Shown three ways — the locked dependency closure of each app holds none of them;
every module of both apps, the store and the statistics import and read a store in a process where
torch, diffusers, accelerate, fcr-sample and fcr-train cannot be imported; and the fcr-eval command
of such an install says which extra its experiment commands need."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "diffusers", "accelerate"}
BLOCKED = ("torch", "diffusers", "accelerate", "transformers", "fcr_sample", "fcr_train")


def _closure(packages: dict, name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every package ``name`` (with ``extras``) installs, from uv.lock (no dev groups)."""
    names: set[str] = set()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(name, tuple(extras))]
    while todo:
        pkg, wanted = todo.pop()
        if (pkg, wanted) in seen:
            continue
        seen.add((pkg, wanted))
        entry = packages[pkg]
        deps = list(entry.get("dependencies", []))
        for extra in wanted:
            deps += entry.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            names.add(dep["name"])
            todo.append((dep["name"], tuple(dep.get("extra", ()))))
    return names


def test_the_apps_lock_no_torch_diffusers_or_accelerate():
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    packages = {p["name"]: p for p in lock["package"]}
    for app in ("fcr-results-explorer", "fcr-human-study", "fcr-eval"):
        assert not HEAVY & _closure(packages, app), f"{app} installs {sorted(HEAVY & _closure(packages, app))}"
    # the check can fail: the runner extra brings them
    assert HEAVY <= _closure(packages, "fcr-eval", ("run",))


_SCRIPT = """
import importlib, pkgutil, sys


class Blocked:  # any import of these raises ImportError, as where they are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocked())
import fcr_results_explorer, fcr_human_study
names = []
for pkg in (fcr_results_explorer, fcr_human_study):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name.endswith((".app", "__main__")):  # Streamlit / Gradio page scripts: they draw on import
            continue
        importlib.import_module(m.name)
        names.append(m.name)
from fcr_eval.analysis.stats import mean_ci, seed_summary
from fcr_eval.store import MetricRecord, ResultsStore, RunRecord, RunResult, make_run_id
store = ResultsStore(sys.argv[1])
for seed, value in enumerate([1.0, 2.0, 3.0]):
    run = RunRecord(make_run_id("e", "v", seed, {{}}), "e", "v", seed, "m", "d", "fd", "ddim", 28, 4, 1.0)
    store.write_run(RunResult(run, metrics=[MetricRecord("kid_x", value, "x", "none", 10)]))
summary = seed_summary(ResultsStore.open_readonly(sys.argv[1]).metrics(experiment_id="e"))
assert summary["mean"].to_list() == [2.0], summary
print(len(names), "modules", sorted(set(sys.modules) & set({blocked!r})))
"""


@pytest.mark.slow
def test_the_apps_and_the_store_work_without_torch(tmp_path):
    """slow: a fresh interpreter imports both apps whole (Streamlit, Gradio) — ~20 s on 2 cores."""
    script = textwrap.dedent(_SCRIPT.format(blocked=BLOCKED))
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.duckdb")], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    n = int(r.stdout.split()[0])
    assert n >= 15, r.stdout  # every reader, query, view helper and CLI module of the two apps


def test_the_fcr_eval_command_of_a_light_install_names_the_extra(tmp_path):
    script = ("import sys\nsys.modules['fcr_train'] = sys.modules['fcr_sample'] = None\n"
              "from fcr_eval.cli import main\nsys.exit(main(['plan', 'experiments/mini-exp-1.toml', '--json']))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "pip install 'fcr-eval[run]'" in r.stderr and "Traceback" not in r.stderr
