"""Both Wan 2.2 A14B experts in one run: the family of a config with an `experts` section
(training/loop.py picks it; the state: sora_jax/run/experts.py; docs/wan.md, "Both experts
in one run").

It is the DiT family (training/families.py) with the two-expert model: the state holds
`{'high': ..., 'low': ...}` parameters, optimizer state and EMA, each expert sharded as a
one-expert run would be; the step is the DiT's (training/step.py) over
`wan_experts.TwoExpertDiT`, whose output routes each sample to the expert of its time, so
each expert's gradient comes only from the samples in its range. Data, LoRA (per expert),
`--init_from` (a checkpoint of the same two-expert tree, e.g. `python -m sora_jax.wan
import --src=PIPELINE_DIR`), resume, rollback, SIGTERM, metrics and checkpoints are the
loop's, unchanged.
"""

from __future__ import annotations

import dataclasses

from sora_jax.run import experts as experts_run
from sora_jax.run import train_state as state_lib
from sora_jax.training import families

# Both experts run forward and backward on every sample (the routing masks the other
# expert's rows): the step's model FLOPs are twice the planner's 3F of one VideoDiT.
STEP_EXPERTS = 2


class TwoExperts(families.DiT):
    """Wan 2.2 A14B's two experts trained together (module doc)."""

    def state(self):
        self.model, self.tx, init_fn, abstract, shardings = experts_run.setup_state(
            self.config, self.manifest, self.mesh, self.rules
        )
        self.lora = abstract.base is not None  # checkpoints hold the factors, not the base
        return init_fn, abstract, shardings

    def describe(self, state) -> str:
        n = {k: state_lib.param_count(v) for k, v in state.params.items()}
        what = "LoRA parameters" if self.lora else "parameters"
        return (
            f"two experts (boundary {self.model.boundary_ratio:g}): high {n['high']:,}, "
            f"low {n['low']:,} {what}"
        )

    def compile(self, abstract, shardings) -> dict[str, families.CompiledStep]:
        steps = super().compile(abstract, shardings)
        return {
            b: dataclasses.replace(s, flops=None if s.flops is None else s.flops * STEP_EXPERTS)
            for b, s in steps.items()
        }
