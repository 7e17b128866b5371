"""contsup eval: a run's test error and every head's accuracy, on its own or a changed [data];
contsup.load_model: the trained network as a plain nn.Module, used here with torch alone."""

from __future__ import annotations

import io
import json

import pytest
import torch

import contsup
from contsup.cli import main
from contsup.training.rundir import read_metrics

from tiny import one_thread, tiny_recipe_text  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-epoch run (and its recipe file)."""
    root = tmp_path_factory.mktemp("eval")
    run = root / "run"
    path = root / "run.toml"
    path.write_text(tiny_recipe_text(run, modules=3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", str(path)]) == 0
    torch.set_num_threads(threads)
    return run


def test_eval_reports_what_the_last_epoch_measured(finished_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(finished_run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    last = read_metrics(finished_run)[-1]
    assert report["weights"] == "model.pt" and report["images"] == 16 and report["dataset"] == "synthetic"
    assert report["test_error_pct"] == pytest.approx(last["test_error_pct"])
    assert report["test_loss"] == pytest.approx(last["test_loss"])
    assert report["local_acc_pct"] == pytest.approx(last["test_local_acc_pct"])
    assert main(["eval", str(finished_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{finished_run}: model.pt; synthetic test set, 16 images"
    assert out[1] == f"test error: {last['test_error_pct']:.2f}% (loss {last['test_loss']:.4f})"
    assert out[2].split() == ["module", "head", "test", "accuracy", "%"]
    assert [row.split()[:2] for row in out[4:]] == [["1", "local"], ["2", "local"], ["3", "final"]]


def test_eval_data_overrides_the_data_table(finished_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(finished_run), "--data", "test_size=40", "--data", "test_batch_size=7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 40
    assert main(["eval", str(finished_run), "--data", "tset_size=40"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "data.tset_size: unknown key for data 'synthetic'; did you mean 'test_size'?" in err[0]
    assert err[0].endswith("(from --data tset_size)")  # what the user typed
    assert main(["eval", str(finished_run), "--data", "noequals"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --data noequals: expected KEY=VALUE"]
    assert main(["eval", str(finished_run), "--data", "shape=[1, 8, 8]"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: {finished_run}: the saved weights do not fit the network for this [data] (size mismatch for "
        f"blocks.0.body.0.0.weight: copying a param with shape torch.Size([16, 3, 3, 3]) from checkpoint, the shape "
        f"in current model is torch.Size([16, 1, 3, 3]).; size mismatch for "
    ) and err[0].endswith("...)")


def test_eval_of_an_unfinished_run_uses_its_newest_checkpoint(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "unfinished"
    shutil.copytree(finished_run, run)
    (run / "model.pt").unlink()
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "checkpoint step-000000008.pt (end of epoch 2)"
    assert report["test_error_pct"] == pytest.approx(read_metrics(run)[-1]["test_error_pct"])
    with pytest.raises(contsup.ContsupError, match="has no model.pt; the run has not finished"):
        contsup.load_model(run)
    for argv, message in [
        (["eval", str(tmp_path)], f"{tmp_path}: not a run directory (it has no recipe.toml)"),
        (["eval", str(run), "--device", "cuda:7"], "run.device: 'cuda:7' was asked for but CUDA is not available here"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and message in err[0]


def test_load_model_is_a_plain_module_usable_with_torch_alone(finished_run):
    model = contsup.load_model(finished_run)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert all(not m.training for m in model.modules())
    # the test set, rebuilt with torch alone: synthetic images are class templates plus noise
    from contsup_datasets import Synthetic

    recipe_data = {"shape": (3, 8, 8), "train_size": 32, "test_size": 16}
    test = Synthetic(Synthetic.Options(**recipe_data)).load(train=False)
    x, y = test.tensors
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (16, 10)
    error = 100.0 * float((logits.argmax(1) != y).float().mean())
    assert error == pytest.approx(read_metrics(finished_run)[-1]["test_error_pct"])
    # an ordinary module: torch.export captures it whole, and the saved program runs with torch alone
    exported = torch.export.export(model, (x,))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    assert torch.allclose(torch.export.load(buffer).module()(x), logits, atol=1e-5)
