"""Recipes that validate also run: every number option stays within what torch and the data
plugins accept (checked when the recipe is validated, one line naming the key, the value and the
range), and a run that fails at its first step leaves no run directory behind."""

from __future__ import annotations

import attrs
import pytest

from contsup import api
from contsup.cli import main
from contsup.errors import ContsupError
from contsup.options import option, structure

from conftest import ROOT
from tiny import one_thread, tiny_recipe_text  # noqa: F401 (one_thread: a fixture, applied here)

DIGITS = ROOT / "recipes" / "digits.toml"


def validate_lines(capsys, path, *sets: str) -> list[str]:
    argv = ["validate", str(path)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return [str(code), *err.splitlines()]


@pytest.mark.parametrize("setting, line", [
    ("run.seed=18446744073709551616",
     "run.seed: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 18446744073709551616"),
    ("data.split_seed=-1", "data.split_seed: must be >= 0, got -1 (allowed: 0 to 4294967295)"),
    ("data.split_seed=4294967296", "data.split_seed: must be <= 4294967295, got 4294967296 (allowed: 0 to 4294967295)"),
    ("optimizer.lr=1e308", "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+308"),
    ("optimizer.lr=3.5e38", "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 3.5e+38"),
    ("optimizer.lr=1" + "0" * 400,
     "optimizer.lr: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got an integer of 401 digits (100000...)"),
    ("optimizer.weight_decay=1e39",
     "optimizer.weight_decay: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+39"),
    ("run.epochs=1000000000000000000000",
     "run.epochs: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 1000000000000000000000"),
    ("run.epochs=1000001", "run.epochs: must be <= 1000000, got 1000001 (allowed: 1 to 1000000)"),
    ("schedule.warmup_epochs=1e9", "schedule.warmup_epochs: must be <= 1000000, got 1000000000.0 (allowed: 0 to 1000000)"),
    ("data.workers=100000000000", "data.workers: must be <= 1024, got 100000000000 (allowed: 0 to 1024)"),
    ("distributed.timeout_s=1e30", "distributed.timeout_s: must be <= 1000000000, got 1e+30 (allowed: 1 to 1000000000)"),
])
def test_numbers_a_run_cannot_take_are_refused_in_validation(capsys, setting, line):
    key = setting.partition("=")[0]
    assert validate_lines(capsys, DIGITS, setting) == ["2", f"error: {DIGITS}: {line} (from --set {key})"]


@pytest.mark.parametrize("setting", [
    "run.seed=9223372036854775807", "run.seed=-9223372036854775808", "data.split_seed=4294967295",
    "optimizer.lr=3.4e38", "run.epochs=1000000", "schedule.warmup_epochs=1000000", "data.workers=1024",
])
def test_the_ends_of_each_range_are_allowed(capsys, setting):
    code, *lines = validate_lines(capsys, DIGITS, setting)
    assert (code, lines) == ("0", [])


def test_synthetic_noise_that_makes_the_first_loss_nan_is_refused(capsys, write_recipe):
    """Noise of 3e38 fits float32 but made the images infinite: a NaN loss, blamed on the lr."""
    path = write_recipe(tiny_recipe_text(""))
    assert validate_lines(capsys, path, "data.noise=3e38") == [
        "2", f"error: {path}: data.noise: must be <= 1000000.0, got 3e+38 (allowed: 0.0 to 1000000.0) (from --set data.noise)"]


def test_list_items_are_bounded_too(capsys, write_recipe):
    path = write_recipe(tiny_recipe_text(""))
    assert validate_lines(capsys, path, "data.shape=[3, 8, 9223372036854775808]") == [
        "2", f"error: {path}: data.shape: item 2: must be a 64-bit integer, in [-9223372036854775808, "
             f"9223372036854775807], got 9223372036854775808 (from --set data.shape)"]


def test_a_plugins_options_get_the_bounds_without_declaring_them():
    """Third-party Options classes need no validators for the limits every number has."""

    @attrs.frozen
    class Options:
        count: int = option(1, doc="a count")
        scale: float = option(1.0, doc="a scale")

    options, problems = structure(Options, {"count": 2**63, "scale": 1e39}, "x.toml: thing")
    assert options is None
    assert problems == [
        "x.toml: thing.count: must be a 64-bit integer, in [-9223372036854775808, 9223372036854775807], got 9223372036854775808",
        "x.toml: thing.scale: must be within float32's range, [-3.4028235e+38, 3.4028235e+38], got 1e+39",
    ]
    assert structure(Options, {"count": 2**63 - 1, "scale": -3.4e38}, "x.toml: thing")[1] == []


def test_a_run_failing_at_its_first_step_leaves_no_run_directory(tmp_path, capsys):
    """A weight decay within float32's range still makes the first step's parameters infinite:
    the run stops with one line, and the same command works once the recipe is fixed."""
    out = tmp_path / "run"
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_recipe_text(out, epochs=1, train_size=16))
    with pytest.raises(ContsupError, match="became n"):
        api.train(path, ["optimizer.weight_decay=3e38"])
    assert not out.exists()
    run = api.train(path)
    assert run.run_dir == out and (out / "model.pt").exists()


# -- what validate reads: one line for each way a recipe file can be broken --------------------


def test_a_symbolic_link_loop_is_one_line(tmp_path, capsys):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop.name)
    assert validate_lines(capsys, loop) == [
        "2", f"error: {loop}: a symbolic link loop (the link leads back to itself); point it at a recipe file"]
    child = tmp_path / "child.toml"
    child.write_text('extends = "loop.toml"\n')
    assert validate_lines(capsys, child) == [
        "2", f"error: {child}: extends: {loop}: a symbolic link loop (the link leads back to itself); point it at a recipe file"]


@pytest.mark.parametrize("text, where", [
    ("x = " + "[" * 800 + "]" * 800 + "\n", ""),  # deep enough for the TOML reader's own recursion
    ("x = " + "{a = " * 300 + "1" + "}" * 300 + "\n", " (x.a.a ... a.a)"),
    ("[" + ".".join(["a"] * 2000) + "]\n", " (a.a.a ... a.a)"),
    (".".join(["a"] * 2000) + " = 1\n", " (a.a.a ... a.a)"),
    ("x = " + "[" * 40 + "]" * 40 + "\n", " (x.0.0 ... 0.0)"),
])
def test_tables_and_arrays_nested_hundreds_deep_are_one_line(write_recipe, capsys, text, where):
    path = write_recipe(text)
    assert validate_lines(capsys, path) == [
        "2", f"error: {path}: tables or arrays nested more than 32 levels deep{where}; a recipe needs a few levels"]


def test_an_extends_chain_hundreds_deep_is_one_line(tmp_path, capsys):
    for i in range(400):
        (tmp_path / f"c{i}.toml").write_text(f'extends = "c{i + 1}.toml"\n')
    (tmp_path / "c400.toml").write_text(tiny_recipe_text(""))
    assert validate_lines(capsys, tmp_path / "c0.toml") == ["2", (
        f"error: {tmp_path / 'c0.toml'}: extends: a chain of more than 64 recipes (c0.toml -> ... -> "
        f"{tmp_path / 'c64.toml'}); at most 64 recipes can extend one another")]
    (tmp_path / "c63.toml").write_text(tiny_recipe_text(""))  # 64 recipes extending one another are fine
    assert validate_lines(capsys, tmp_path / "c0.toml")[0] == "0"


def test_a_byte_order_mark_is_accepted(write_recipe, capsys):
    path = write_recipe(tiny_recipe_text(""))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert validate_lines(capsys, path) == ["0"]


@pytest.mark.parametrize("char, kind", [("\x00", "a NUL byte (\\x00)"), ("\x07", "a control character (\\x07)")])
def test_a_nul_byte_or_control_character_is_named_with_its_position(write_recipe, capsys, char, kind):
    path = write_recipe(f"[run]\nseed = 1{char}\n")
    assert validate_lines(capsys, path) == [
        "2", f"error: {path}: not valid TOML: {kind} at line 2, column 9; a recipe is plain text: remove it"]


def test_extends_naming_no_file_or_a_directory_names_extends_and_the_recipe(tmp_path, capsys):
    path = tmp_path / "recipe.toml"
    path.write_text('extends = ""\n')
    assert validate_lines(capsys, path) == [
        "2", f'error: {path}: extends: "" names no file; give a recipe file (relative to {tmp_path})']
    (tmp_path / "base").mkdir()
    path.write_text('extends = "base"\n')
    assert validate_lines(capsys, path) == [
        "2", f"error: {path}: extends: {tmp_path / 'base'} is a directory, not a recipe file"]


def test_set_extends_is_refused_not_ignored(write_recipe, capsys):
    path = write_recipe(tiny_recipe_text(""))
    assert validate_lines(capsys, path, "extends=other.toml") == ["2", (
        "error: --set extends=other.toml: extends cannot be set on the command line (the recipes it names are "
        "merged before --set applies); write extends in the recipe, or --set the keys themselves")]


def test_set_values_nested_too_deep_are_one_short_line(write_recipe, capsys):
    path = write_recipe(tiny_recipe_text(""))
    deep = "x=" + "[" * 2000 + "]" * 2000
    assert validate_lines(capsys, path, deep) == [
        "2", f"error: --set {deep[:60]}...(4002 characters): nests tables or arrays more than 32 levels deep; "
             f"a recipe needs a few levels"]
    assert validate_lines(capsys, path, ".".join(["a"] * 40) + "=1")[0] == "2"


@pytest.mark.parametrize("setting, line", [
    ("bogus.x=1", "bogus: unknown section; did you mean"),
    ("modules.0.range=[5, 1]", "modules: expected [[modules]] tables"),
    ("optimizer.nesterov=true", "optimizer.momentum: must be > 0 while nesterov = true"),
    ("run={epochs = 0}", "run.epochs: must be >= 1, got 0 (allowed: 1 to 1000000)"),
    ("data.use=digits", "data.shape: unknown key for data 'digits'"),
])
def test_problems_a_set_causes_say_which_set(write_recipe, capsys, setting, line):
    """Found by test_recipe_fuzz: problems about a table holding the key, a key beside a changed
    `use` or a cross-field check naming the key lacked the mark."""
    path = write_recipe(tiny_recipe_text("").replace("lr = 0.05", "lr = 0.05\nmomentum = 0.0\nnesterov = false"))
    key = ".".join(p.strip() for p in setting.partition("=")[0].split("."))
    code, *lines = validate_lines(capsys, path, setting)
    hits = [item for item in lines if line in item]
    assert code == "2" and hits and all(item.endswith(f" (from --set {key})") for item in hits), lines


def test_an_integer_of_thousands_of_digits_is_one_line(write_recipe, capsys):
    """Python refuses to convert integer literals past its digit limit: a traceback before."""
    huge = "9" * 5000
    path = write_recipe(f"[run]\nseed = {huge}\n")
    digits = "an integer of more than 4300 digits; no option takes one near that large (integers are 64-bit)"
    assert validate_lines(capsys, path) == ["2", f"error: {path}: {digits}"]
    (code, line) = validate_lines(capsys, DIGITS, f"run.seed={huge}")
    assert code == "2" and line.startswith("error: --set run.seed=999") and line.endswith(f"(5009 characters): {digits}")


def test_an_unterminated_string_is_named_without_an_escape(write_recipe, capsys):
    path = write_recipe('[run]\nout_dir = "runs\n')
    assert validate_lines(capsys, path) == [
        "2", f"error: {path}: not valid TOML: a line break inside a one-line string (is a closing quote missing?) "
             f"(at line 2, column 16)"]
