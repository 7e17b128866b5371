"""Progress lines: plain periodic lines off a terminal, and a resumed epoch counts on from the
step it resumed at."""

from __future__ import annotations

import io
import re

from contsup.progress import Progress


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
