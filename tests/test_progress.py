"""Progress lines: plain periodic lines off a terminal, and a resumed epoch counts on from the
step it resumed at."""

from __future__ import annotations

import io
import re

from contsup.training.progress import Progress


def test_plain_lines_every_n_steps_with_each_modules_loss():
    out = io.StringIO()
    p = Progress(2, 5, 4, every=2, stream=out)
    for step in range(1, 5):
        p.update(step, [1.0, None, 0.25])
    p.close()
    lines = out.getvalue().splitlines()
    assert [re.sub(r"\[.*?\]", "[]", line) for line in lines] == [
        "epoch 2/5 step 2/4 [] loss per module: 1.000 - 0.250",
        "epoch 2/5 step 4/4 [] loss per module: 1.000 - 0.250",
    ]


def test_a_resumed_epoch_starts_at_its_step_and_estimates_from_what_it_ran():
    out = io.StringIO()
    p = Progress(1, 1, 10, every=1, stream=out, done=6)
    p.start -= 4.0  # four seconds for the steps run in this process
    p.update(8, [0.5])
    line = out.getvalue()
    assert "step 8/10" in line
    eta = float(re.search(r"eta\s+([\d.]+)s", line).group(1))
    assert 3.9 <= eta <= 4.2  # 2 steps took ~4 s here, 2 remain


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_each_modules_loss_that_goes_away_at_the_end():
    out = _Terminal()
    p = Progress(1, 3, 4, stream=out)
    p.bar.mininterval = 0  # draw every step: a real bar redraws at most 10 times a second
    for step in range(1, 5):
        p.update(step, [2.5, 0.125])
    drawn = out.getvalue()
    assert "epoch 1/3" in drawn and "4/4" in drawn and "100%" in drawn
    assert "loss 2.500 0.125" in drawn
    p.close()
    assert out.getvalue()[len(drawn):].strip() == ""  # the bar is blanked out: the epoch's line follows


def test_a_resumed_epochs_bar_starts_at_the_step_it_resumed_at():
    out = _Terminal()
    p = Progress(1, 1, 10, stream=out, done=6)
    p.bar.mininterval = 0
    assert "6/10" in out.getvalue()
    p.update(7, [0.5])
    p.close()
    assert "7/10" in out.getvalue()
