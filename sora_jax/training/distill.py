"""Distillation as a training mode of the one loop: the family of a config with a `distill`
section (training/loop.py picks it), which trains a few-step student of a frozen teacher
by continuous-time consistency distillation (`distill.method='scm'`, the maths:
sora_jax/diffusion/consistency.py; the step and state: training/distill_step.py) or by
distribution matching (`'dmd2'`: sora_jax/diffusion/dmd.py, training/dmd_step.py); the
fields: experiments/distill.py.

It is the DiT family (training/families.py) with three differences: the state's frozen
`base` holds the teacher, read from `distill.teacher` at every start (fresh or resumed:
frozen parts are never checkpointed, so a checkpoint is a plain DiT checkpoint of the
student); the student starts as a copy of the teacher (parameters and EMA); and the
compiled step is the distillation step; DMD2's fake-score network starts as a copy of the
teacher too and lives in the state's `opt_state` (checkpointed and resumed with it). Data,
resume, rollback, SIGTERM, metrics and checkpoints are the loop's, unchanged. The run's
`config.json` keeps the `distill` section, which is how `sora_jax.sample` and the
evaluators know to sample it with the consistency sampler (sora_jax/evaluation/generate.py).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sora_jax.run import train_state as state_lib
from sora_jax.training import distill_step, eval_hook, families
from sora_jax.training import plan as plan_lib

log = logging.getLogger(__name__)

# The step's model FLOPs in units of F (one forward of one sample), for perf/mfu: the guided
# teacher (2F: both branches), the student's JVP (2F: the primal and its tangent) and the
# student's forward and backward (3F). The plan's TFLOP column counts 3F (the DiT's step).
STEP_FORWARDS = 7.0
# DMD2 with K fake updates per generator update: every step the generator's forward (1F)
# and the fake score's forward and backward (3F); every K-th also the generator's backward
# (2F), the guided real score (2F) and the fake score's forward (1F).
DMD2_FORWARDS = lambda k: 4.0 + 5.0 / k  # noqa: E731


class Distill(families.DiT):
    """A few-step student of `distill.teacher` (module doc)."""

    def state(self):
        self.model, self.tx, init_fn, abstract, shardings = distill_step.setup_state(
            self.config, self.manifest, self.mesh, self.rules
        )
        self.lora = False
        self.shardings = shardings
        return init_fn, abstract, shardings

    def _teacher(self, abstract, fresh_params):
        with jax.set_mesh(self.mesh):
            params, source = distill_step.load_teacher(self.config, abstract.params, fresh_params)
        print(f"distill: teacher {source} ({distill_step.options(self.config).teacher_source})")
        return params

    def fresh(self, init_fn, abstract, init_from: str):
        if init_from:
            raise ValueError(
                f"--init_from={init_from} (training.init_from) does not apply to distillation: "
                "the student starts from distill.teacher; drop --init_from"
            )
        state = state_lib.create_sharded_state(init_fn, self.mesh, self.rules, self.config.seed)
        teacher = self._teacher(abstract, state.params)
        # The student, its EMA and the teacher start equal, each in buffers of its own: the
        # step donates the state, and one buffer donated twice is an error. The optimizer's
        # fresh state does not depend on the parameters' values.
        copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
        ema = {k: copy(teacher) for k in state.ema}
        state = state.replace(params=copy(teacher), ema=ema, base=teacher)
        if distill_step.options(self.config).method == "dmd2":  # the fake score: the teacher
            state = state.replace(opt_state={**state.opt_state, "fake_score": copy(teacher)})
        return state

    def resumed(self, state, init_fn, abstract, shardings):
        del init_fn, shardings
        return state.replace(base=self._teacher(abstract, state.params))

    def describe(self, state) -> str:
        n, n_teacher = state_lib.param_count(state.params), state_lib.param_count(state.base)
        line = f"distill: student {n:,} parameters, frozen teacher {n_teacher:,}"
        if distill_step.options(self.config).method == "dmd2":
            n_fake = state_lib.param_count(state.opt_state["fake_score"])
            line += f", fake-score network {n_fake:,} (trained, in opt_state; DMD2)"
        return line

    def compile(self, abstract, shardings) -> dict[str, families.CompiledStep]:
        jitted = distill_step.jit_distill_step(
            self.model, self.tx, self.config, self.mesh, shardings
        )
        shapes = plan_lib.pipeline_step_shapes(self.pipeline)
        compiled, plans = plan_lib.compile_steps(
            jitted, abstract, self.manifest, shapes, self.config, self.mesh, self.rules
        )
        log.info("compiled %d bucket(s) in %.1f s", len(plans), sum(p.compile_s for p in plans))
        self.evaluator = eval_hook.Evaluator(
            self.config, self.workdir, self.pipeline, self.model, self.mesh, self.manifest
        )
        return {
            p.bucket: families.CompiledStep(
                executable=compiled[p.bucket],
                batch=plan_lib.abstract_batch(self.manifest, s, self.mesh),
                global_batch=p.global_batch,
                tokens=p.tokens,
                flops=p.model_tflops_per_step * 1e12 * self._forwards() / 3.0,
                fingerprint=p.fingerprint,
            )
            for s, p in zip(shapes, plans, strict=True)
        }

    def _forwards(self) -> float:
        d = distill_step.options(self.config)
        return DMD2_FORWARDS(d.fake_updates_per_generator) if d.method == "dmd2" else STEP_FORWARDS

    def evaluate(self, state, step: int) -> dict[str, float]:
        # The evaluators read `base` as a LoRA base; here it is the teacher: leave it out.
        return self.evaluator(state.replace(base=None), step)
