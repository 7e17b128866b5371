"""Imported once by the process server of tests/ranks.py: one thread, then everything heavy."""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

import torch.distributed  # noqa: E402,F401

import contsup.cli  # noqa: E402,F401
import contsup.distributed.data_parallel  # noqa: E402,F401
import contsup.distributed.pipeline  # noqa: E402,F401
import contsup.api  # noqa: E402,F401  (what contsup train runs: the API and the launcher)
from contsup.core.plugins import get_plugin_manager  # noqa: E402

get_plugin_manager()  # imports every built-in plugin (timm among them)
