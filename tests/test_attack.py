"""The attack harness's classifier (benchmarks/attack.py) on canned outputs; the attack itself is
a benchmark, not part of the test run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def attack():
    spec = importlib.util.spec_from_file_location("attack", ROOT / "benchmarks" / "attack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["attack"]


TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nOverflowError: Overflow when unpacking long long\n'


@pytest.mark.parametrize("exit_code, stderr, timed_out, expected", [
    (2, "error: recipe.toml: [run] seed: 18446744073709551616 is above 2**63 - 1\n", False, "clean"),
    (2, "warning: something minor\nerror: recipe.toml: [run] epochs: must be at least 1\n", False, "clean"),
    (2, "error: first line\nand a second one\n", False, "multiline"),
    (2, "error: r.toml: data.use: missing required key\nerror: r.toml: backbone.use: missing required key\n", False, "clean"),
    (2, "error: Weights only load failed.\\nRe-running `torch.load` with `weights_only` set to `False`\n", False, "multiline"),
    (2, "oops, not an error line\n", False, "multiline"),
    (2, "", False, "multiline"),
    (1, TRACEBACK, False, "traceback"),
    (2, "error: x\n" + TRACEBACK, False, "traceback"),
    (0, "", False, "trained"),
    (1, "error: No space left on device\n", False, "other"),
    (-9, "", False, "other"),
    (None, "", True, "hang"),
])
def test_classify(attack, exit_code, stderr, timed_out, expected):
    assert attack.classify(exit_code, stderr, timed_out) == expected


def test_classify_names_what_an_accepted_input_is(attack):
    assert attack.classify(0, "", accepted="valid") == "valid"
    assert attack.first_line("warning: w\nerror: the problem\n") == "error: the problem"
    assert attack.first_line("") == ""
    assert attack.first_line(TRACEBACK) == "OverflowError: Overflow when unpacking long long"


def test_unsafe_advice_flags_torchs_weights_only_text_and_escape_codes(attack):
    assert attack.unsafe_advice("error: model.pt: cannot be read (Re-running `torch.load` with `weights_only` set to `False` ...)")
    assert attack.unsafe_advice("error: x \x1b[1mdo those steps\x1b[0m")
    assert not attack.unsafe_advice("error: model.pt: not a weights file (it would run code when loaded)")


def test_classify_damage_tells_unaffected_warned_and_silent_apart(attack):
    intact = "test error: 3.89%\n"
    assert attack.classify_damage(0, "", intact, intact) == "unaffected"
    assert attack.classify_damage(0, "warning: model.pt is damaged; using the newest checkpoint\n", "test error: 4.1%\n", intact) == "warned"
    assert attack.classify_damage(0, "", "test error: 90.0%\n", intact) == "silent"
    assert attack.classify_damage(0, "warning: model.pt could not be verified: it has no digest\n", intact, intact) == "warned"
    assert attack.classify_damage(2, "error: model.pt: its contents changed after writing\n", "", intact) == "clean"
    assert attack.classify_damage(1, TRACEBACK, "", intact) == "traceback"


def test_run_comparisons(attack):
    metrics = [{"epoch": 1, "test_error_pct": 3.0, "images_per_s": 1.0, "epoch_time_s": 2.0, "peak_memory_bytes": 3}]
    assert attack.without_measured(metrics) == [{"epoch": 1, "test_error_pct": 3.0}]
    assert attack.strictly_increasing([1, 2, 3])
    assert not attack.strictly_increasing([1, 2, 3, 3, 4])
    assert not attack.strictly_increasing([1, 1, 2])
    assert attack.steps_lost(done_at_kill=10, resumed_from=5, interval=5) == 0
    assert attack.steps_lost(done_at_kill=12, resumed_from=0, interval=5) == 7


def test_counts_and_markdown(attack):
    cases = [
        {"category": "kills", "case": "a", "outcome": "survived", "bit_exact": True, "lost_beyond_interval": 0, "exit": 0, "stderr": ""},
        {"category": "kills", "case": "b", "outcome": "traceback", "bit_exact": False, "lost_beyond_interval": 4, "exit": 1,
         "stderr": "Traceback (most recent call last):"},
        {"category": "malformed", "case": "c", "step": "train", "outcome": "clean", "exit": 2, "stderr": "error: x"},
        {"category": "damage", "case": "d", "outcome": "silent", "exit": 0, "stderr": ""},
    ]
    table = attack.counts(cases)
    assert table["kills"] == {"tried": 2, "clean": 1, "traceback": 1, "other": 0, "survived": 1, "bit-exact": 1, "data lost": 1}
    assert table["damage"]["data lost"] == 1 and table["damage"]["other"] == 1
    md = attack.markdown(cases, 1.0, quick=True)
    assert "| kills | 2 | 1 | 1 | 0 | 1 | 1 | 1 |" in md
    assert "## Not clean (2)" in md and "4 steps lost beyond the interval" in md and "- damage: d: silent" in md


def test_a_contsup_error_raised_by_the_python_api_is_its_contract_not_a_traceback(attack):
    cases = [
        {"case": "raw pickle as model.pt -> load_model", "outcome": "traceback",
         "stderr": "contsup.errors.ContsupError: run/model.pt: cannot be read"},
        {"case": "model.pt: truncate -> load_model", "outcome": "traceback", "stderr": "TypeError: Expected state_dict"},
        {"case": "model.pt: truncate -> eval", "outcome": "traceback", "stderr": "contsup.errors.ContsupError: x"},
    ]
    assert [c["outcome"] for c in attack.api_contract(cases)] == ["clean", "traceback", "traceback"]
    assert cases[0]["stderr"] == "error: run/model.pt: cannot be read"


def test_eval_naming_the_checkpoint_it_read_is_not_a_different_output(attack):
    run = Path("/x/run")
    from_model = attack.normalise("/x/run: model.pt; digits test set, 360 images\ntest error: 3.89%\n", run)
    from_checkpoint = attack.normalise("/x/run: checkpoint step-000000046.pt (end of epoch 2); digits test set, 360 images\n"
                                       "test error: 3.89%\n", run)
    assert from_model == from_checkpoint
    assert attack.classify_damage(0, "", from_checkpoint, from_model) == "unaffected"
    assert attack.normalise("/x/run: model.pt; digits\ntest error: 4.17%\n", run) != from_model


def test_a_refused_write_may_exit_1_where_the_case_says_so(attack):
    line = "error: cannot write run/model.pt (No space left on device) for the run run; ...\n"
    assert attack.classify(1, line) == "other"  # bad input exits 2
    assert attack.classify(1, line, clean_exits=(1, 2)) == "clean"  # the machine refused a write
    assert attack.classify(1, "Traceback (most recent call last):\n", clean_exits=(1, 2)) == "traceback"
