"""Orbax checkpoints of a training run: params, optimizer state, step and data-iterator state.

One checkpoint per saved step under `directory/<step>/`, items:
  params     master weights (StandardSave: sharded arrays, restored onto any mesh)
  opt_state  optax state
  meta       JSON {"step": int}
  data       JSON: the Grain iterator state after the step's batch, so resuming continues
             with the very next batch
Saves are asynchronous (training continues while arrays are written); Orbax writes into a
temporary folder and renames it when complete, and only then deletes checkpoints beyond `keep`,
so an interruption never damages a finished checkpoint: a process killed (`kill -9`) while saving
leaves a temporary folder that is not a checkpoint, and the previous one stays the latest
(tests/test_kill.py). Over several processes each writes the shards its devices hold. There is no rng: the step has no
stochastic part, and the data order is a function of the config seed and the iterator state.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from svlm_jax.config import ModelConfig
from svlm_jax.model.params import Params, param_shapes
from svlm_jax.train.step import TrainState


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.manager = ocp.CheckpointManager(
            Path(directory).resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict) -> None:
        """Starts saving (returns before the arrays are written when async)."""
        step = int(jax.device_get(state.step))
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params), opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({"step": step}), data=ocp.args.JsonSave(data_state)))

    def restore(self, like: TrainState, shardings, step: int | None = None) -> tuple[TrainState, dict]:
        """(state, data-iterator state) of `step` (default: latest); arrays take `shardings`, the
        structure and dtypes of `like` (a TrainState of arrays or ShapeDtypeStructs)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        r = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like.params, shardings.params)),
            opt_state=ocp.args.StandardRestore(_abstract(like.opt_state, shardings.opt_state)),
            meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        step_array = jax.device_put(jax.numpy.asarray(r.meta["step"], jax.numpy.int32), shardings.step)
        return TrainState(step=step_array, params=r.params, opt_state=r.opt_state), r.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_params(cfg: ModelConfig, dtype) -> Params:
    """ShapeDtypeStructs of a model's parameters (what `restore_params` needs)."""
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, dtype), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x))


def restore_params(directory: str | Path, like: Params, step: int | None = None) -> tuple[Params, int]:
    """Only the parameters of a checkpoint (default: the latest step), as host-local arrays."""
    manager = ocp.CheckpointManager(Path(directory).resolve())
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
        r = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
        return r.params, step
    finally:
        manager.close()
