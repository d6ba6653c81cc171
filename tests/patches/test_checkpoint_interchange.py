"""Checkpoints interchange between the plugin's experts and Megatron's own SequentialMLP.

A small GPT with 2 MoE layers (4 experts, top-2), expert parallelism 2 on 2 gloo processes,
Megatron's DDP and Adam (checkpoint_cases.interchange_phase):
- torch_dist, plugin on -> off and off -> on: after the load every weight and both Adam moments
  equal the saver's exactly, and the next two steps' losses equal the uninterrupted run's (fp32,
  1e-5 relative: the same math summed in another order; a resume that lost the Adam state is off by
  more than 1e-3).
- torch format (each rank's plain state_dict), 0.17+: the weights load both ways. Megatron's
  torch-format optimizer state is keyed by parameter position (2 stacked tensors per layer against
  2 per expert), so it cannot move across; loading it across is refused by torch.optim.
- 0.17+: a torch_dist checkpoint written by megatron-core 0.13-0.16's GroupedMLP with the plugin
  (a separate pair of processes with that version first on PYTHONPATH) loads into GmmGroupedMLP and
  into SequentialMLP, weights and Adam moments exactly, next losses as the writer's own.
On megatron-core <= 0.16 the grouped side is the legacy GroupedMLP (its own torch_dist layout,
which Megatron made SequentialMLP's).
"""
from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.megatron

import checkpoint_helpers as ch  # noqa: E402
import mcore_helpers as h  # noqa: E402

MODERN = h.version()[:2] >= (0, 17)
pytestmark = [pytest.mark.megatron,
              pytest.mark.skipif(h.version()[:2] < (0, 13),
                                 reason="megatron-core 0.12's torch_dist does not work with numpy 2 / torch 2.13"),
              pytest.mark.skipif(ch.psutil_path() is None,
                                 reason="psutil is not installed: torch_dist saving would hang (pip install psutil)")]


def test_torch_dist_and_torch_format_interchange_plugin_on_off_ep2():
    run = ch.two_process_run()
    run.check("interchange", 5 if MODERN else 2)


@pytest.mark.skipif(not MODERN, reason="reads a megatron-core 0.13-0.16 checkpoint with 0.17+")
def test_legacy_grouped_mlp_checkpoint_loads_into_gmm_and_sequential():
    if ch.legacy_mcore() is None:
        pytest.skip("no megatron-core 0.13-0.16 installed here (.venv or .mcore/<version>)")
    run = ch.two_process_run()
    run.check("legacy_read", 2)
