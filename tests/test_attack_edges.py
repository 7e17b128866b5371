"""The edge attack's classifier (benchmarks/attack_edges.py) on canned outputs; the attack itself
is a benchmark, not part of the test run."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def edges():
    spec = importlib.util.spec_from_file_location("attack_edges", ROOT / "benchmarks" / "attack_edges.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_edges"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["attack_edges"]


def result(exit_code, stderr="", stdout=""):
    return {"exit": exit_code, "stderr": stderr, "stdout": stdout, "timed_out": False}


def test_a_refusal_holds_only_as_documented(edges, tmp_path):
    line = "error: r.toml: cannot read: it is a FIFO (a named pipe), not a file\n"
    assert edges.refusal(result(2, line), "r.toml") == ("held", "")
    assert edges.refusal(result(1, line), "r.toml")[0] == "unclear"  # exit 1 where 2 is documented
    assert edges.refusal(result(1, line), "r.toml", exits=(1, 2)) == ("held", "")
    assert edges.refusal(result(2, line), "plugin")[0] == "unclear"  # does not name it
    assert edges.refusal(result(2, line), "plugin|fifo") == ("held", "")
    assert edges.refusal(result(0), "r.toml")[0] == "silent"
    assert edges.refusal(result(2, "error: a\nerror: b\n"), "a", single=True)[0] == "unclear"
    assert edges.refusal(result(2, "".join(f"error: --set {c}: expected key.path=value\n" for c in "run.epochs=1")),
                         "overrides")[0] == "unclear"
    assert edges.refusal(result(2, "warning: w\nerror: x names r.toml\n"), "r.toml") == ("held", "")


def test_a_refusal_that_changed_the_run_is_silent(edges, tmp_path):
    (tmp_path / "recipe.toml").write_text("a")
    before = edges.snapshot(tmp_path)
    (tmp_path / "recipe.toml").write_text("b")
    assert edges.refusal(result(2, "error: refused\n"), "refused", before=before, dirs=(tmp_path,))[0] == "silent"


def test_success_and_either(edges):
    assert edges.success(result(0), lambda: None) == ("held", "")
    assert edges.success(result(0), lambda: "lr not applied") == ("silent", "lr not applied")
    assert edges.success(result(2, "error: x\n"), lambda: None)[0] == "unclear"
    assert edges.either(result(2, "error: names key\n"), lambda: "wrong", "key") == ("held", "")
    assert edges.either(result(0), lambda: "wrong", "key") == ("silent", "wrong")


def test_error_lines_leave_out_progress_and_warnings(edges):
    err = "warning: w\nepoch 1/1 step 1/4 [ 1.0s, eta 3.0s] loss\ncontsup 0.1.0: training x\nerror: e\n"
    assert edges.error_lines(err) == ["error: e"]


def test_counts_and_markdown(edges):
    results = [{"family": "files", "case": "a", "outcome": "held", "exit": 2},
               {"family": "files", "case": "b", "outcome": "hang", "exit": None, "why": "no answer", "stderr": []},
               {"family": "api", "case": "c", "outcome": "traceback", "exit": 1, "why": "TypeError", "stderr": ["x"]},
               {"family": "api", "case": "d", "outcome": "setup-failed", "why": "oops"}]
    table = edges.counts(results)
    assert table["all"] == {"tried": 3, "held": 1, "traceback": 1, "unclear": 0, "silent": 0, "hang": 1}
    md = edges.markdown(results, 1.0)
    assert "| all | 3 | 1 | 1 | 0 | 0 | 1 |" in md and "- files: b: **hang**" in md


def test_the_attack_has_at_least_150_cases_in_every_family(edges):
    assert len(edges.CASES) >= 150
    assert {c.family for c in edges.CASES} == set(edges.FAMILIES)
    assert len({(c.family, c.name) for c in edges.CASES}) == len(edges.CASES)
