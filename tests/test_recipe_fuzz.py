"""Bad input never crashes: mutated recipes (deleted keys, typos, wrong types, out-of-range
numbers, unknown names, malformed TOML, empty files, binary garbage) and random ``--set``
values make ``contsup validate`` exit 2 with one-line messages, or 0 when still valid."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contsup.core import tomlw
from contsup.cli import main
from contsup.config.reading import parse_toml

from conftest import ROOT, small_recipe_text

BASES = [
    parse_toml(small_recipe_text(), "small"),
    parse_toml(small_recipe_text(extra="\n[schedule]\nuse = \"constant\"\n\n[log]\ntensorboard = false\n"), "small"),
    parse_toml((ROOT / "recipes" / "digits.toml").read_text(), "digits"),
]
NAMES = ["use", "seed", "epochs", "lr", "modules", "shape", "classes", "batch_size", "device", "mode", "precision",
         "checkpoint_every_steps", "tensorboard", "warmup_epochs", "momentum", "R1E", "cifar_resnet20", "run", "data"]

values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 2, 3, 10**6, 2**31, 2**62, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(["", "auto", "cpu", "cuda:0", "cuda:-1", "mps", "R1E", "M9R9E", "none", "all", "uniform",
                     "nope", "cifar_resnet20", "resnet18", "fp16", "bf16", "e2e", "R0", "E", "R99"]),
    st.lists(st.integers(-3, 40), max_size=5),
    st.lists(st.sampled_from([0, 1, 3, 8, 16, 10**9]), max_size=4),
    st.dictionaries(st.sampled_from(NAMES), st.integers(-2, 5), max_size=2),
)


edge_numbers = st.one_of(
    st.sampled_from([0, -1, 1, 2, 10**9, 2**63 - 1, -(2**63), 0.0, -0.0, 1e-300, 1e300, -1e300, 0.5, 1.0, 1.5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**63 - 1),
)


def typo(word: str, data) -> str:
    if not word:
        return "x"
    i = data.draw(st.integers(0, len(word) - 1))
    kind = data.draw(st.sampled_from(["drop", "double", "swap", "case", "other"]))
    if kind == "drop":
        return word[:i] + word[i + 1:] or "x"
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    if kind == "swap" and len(word) > 1:
        j = min(i + 1, len(word) - 1)
        return word[:i] + word[j] + word[i] + word[j + 1:] if j != i else word + "z"
    if kind == "case":
        return word.upper()
    return word + data.draw(st.sampled_from(["_", "s", "1", "-"]))


def mutate(recipe: dict, data) -> dict:
    """One to three random mutations of a parsed recipe."""
    out = copy.deepcopy(recipe)
    for _ in range(data.draw(st.integers(1, 3))):
        section = data.draw(st.sampled_from(sorted(out) + ["bogus"]))
        table = out.get(section)
        kind = data.draw(st.sampled_from(["delete", "typo", "value", "number", "number", "section", "new key", "use"]))
        if kind == "section" or not isinstance(table, dict):
            choice = data.draw(st.sampled_from(["delete", "value", "typo"]))
            if choice == "delete":
                out.pop(section, None)
            elif choice == "value":
                out[section] = data.draw(values)
            else:
                out[typo(section, data)] = out.pop(section, {})
            continue
        keys = sorted(table)
        if kind == "use":
            table["use"] = data.draw(st.one_of(st.sampled_from(["nope", "R1X", "resnet", "sgdd", "cosin", ""]), values))
        elif kind == "new key":
            table[data.draw(st.sampled_from(NAMES + ["x", "lrr", "momentun"]))] = data.draw(values)
        elif not keys:
            table["use"] = data.draw(values)
        else:
            key = data.draw(st.sampled_from(keys))
            if kind == "delete":
                del table[key]
            elif kind == "typo":
                table[typo(key, data)] = table.pop(key)
            elif kind == "number" and isinstance(table[key], (int, float)) and not isinstance(table[key], bool):
                table[key] = data.draw(edge_numbers)  # the right type, perhaps out of range
            else:
                table[key] = data.draw(values)
    return out


def dumps(recipe: dict) -> str:
    """TOML text; values TOML cannot write (mixed lists) fall back to a string of their repr."""
    try:
        return tomlw.dumps(recipe)
    except (TypeError, ValueError):
        return tomlw.dumps({k: (v if isinstance(v, dict) else repr(v)) for k, v in recipe.items()})


def check_validate(argv: list[str], capsys) -> int:
    code = main(["validate", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = err.splitlines()
        assert lines and all(line.startswith("error: ") and len(line) > len("error: ") for line in lines), err
    else:
        assert ": ok (" in out and not err.strip(), (out, err)
    return code


FUZZ = settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_mutated_recipes_exit_2_with_one_line_per_problem(tmp_path, capsys, data):
    base = data.draw(st.sampled_from(BASES))
    path = tmp_path / "mutated.toml"
    path.write_text(dumps(mutate(base, data)))
    check_validate([str(path)], capsys)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_empty_and_binary_files_exit_2(tmp_path, capsys, data):
    text = small_recipe_text()
    kind = data.draw(st.sampled_from(["cut", "delete char", "insert char", "empty", "binary", "unicode", "whitespace"]))
    if kind == "cut":
        raw = text[: data.draw(st.integers(0, len(text)))].encode()
    elif kind == "delete char":
        i = data.draw(st.integers(0, len(text) - 1))
        raw = (text[:i] + text[i + 1:]).encode()
    elif kind == "insert char":
        i = data.draw(st.integers(0, len(text)))
        raw = (text[:i] + data.draw(st.sampled_from(list("[]{}=\"'.,#\n\\ \t\x00é"))) + text[i:]).encode()
    elif kind == "empty":
        raw = b""
    elif kind == "binary":
        raw = data.draw(st.binary(min_size=1, max_size=200))
    elif kind == "unicode":
        raw = data.draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    else:
        raw = data.draw(st.sampled_from([b" ", b"\n\n", b"\t# only a comment\n"]))
    path = tmp_path / "broken.toml"
    path.write_bytes(raw)
    code = check_validate([str(path)], capsys)
    if kind in ("empty", "whitespace", "binary"):
        assert code == 2


set_keys = st.one_of(
    st.sampled_from(["run.epochs", "run.seed", "run.device", "run.precision", "run.checkpoint_every_steps",
                     "optimizer.lr", "optimizer.use", "data.shape", "data.batch_size", "data.use", "context.use",
                     "partition.modules", "log.tensorboard", "backbone.use", "schedule.warmup_epochs", "run",
                     "decoder.use", "run.seed.x", "a.b.c", "data", "extends"]),
    st.text(alphabet=st.sampled_from(list("abc._= [\"")), min_size=0, max_size=8),
)
set_values = st.one_of(
    st.sampled_from(["1", "-1", "0", "1e400", "nan", "inf", "true", "\"x\"", "[1, 2", "[3, 8, 8]", "{a = 1}",
                     "R1E", "resnet18", "fp16", "cuda:9", "1 2", "=", "\"unterminated", "[]", "{}", "'lit'",
                     "1979-05-27", "0x10", "9223372036854775808", "\n[run]", "1\nseed = 2"]),
    st.text(max_size=10),
)


@FUZZ
@given(data=st.data())
def test_random_set_values_exit_2_with_one_line_per_problem(tmp_path, capsys, data):
    path = tmp_path / "recipe.toml"
    path.write_text(small_recipe_text())
    argv = [str(path)]
    for _ in range(data.draw(st.integers(1, 3))):
        argv += ["--set", f"{data.draw(set_keys)}={data.draw(set_values)}" if data.draw(st.booleans())
                 else data.draw(st.text(max_size=12))]
    check_validate(argv, capsys)


def test_a_few_known_answers(tmp_path, capsys):
    """The fuzzer's checks can fail: a valid recipe passes, known mutations give known lines."""
    path = tmp_path / "recipe.toml"
    path.write_text(small_recipe_text())
    assert check_validate([str(path)], capsys) == 0
    assert check_validate([str(path), "--set", "run.epochs=1e400"], capsys) == 2
    # found by the fuzzer's number mutations: non-finite floats passed validation, then crashed training
    assert main(["validate", str(path), "--set", "optimizer.lr=nan", "--set", "schedule.warmup_epochs=inf"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: optimizer.lr: expected a finite number, got nan (from --set optimizer.lr)",
        f"error: {path}: schedule.warmup_epochs: expected a finite number, got inf (from --set schedule.warmup_epochs)",
    ]
    # found by the --set fuzzer: a value with a line break printed as two lines
    assert main(["validate", str(path), "--set", "a\x85b"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --set a\\x85b: expected key.path=value"]



@FUZZ
@given(data=st.data())
def test_every_problem_a_set_causes_says_which_set(tmp_path, capsys, data):
    """The recipe is valid, so every problem comes from a --set: each line is about the --set
    itself or ends with (from --set KEY) naming one that was given."""
    path = tmp_path / "recipe.toml"
    path.write_text(small_recipe_text())
    sets = [f"{data.draw(set_keys)}={data.draw(set_values)}" for _ in range(data.draw(st.integers(1, 3)))]
    code = main(["validate", str(path), *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    keys = {".".join(p.strip() for p in s.partition("=")[0].strip().split(".")) for s in sets}
    for line in err.splitlines():
        if line.startswith("error: --set "):
            continue
        assert line.endswith(")") and " (from --set " in line, line
        assert line.rpartition(" (from --set ")[2][:-1] in keys, line
