"""One optimizer step of overlapped-chunk SFT, jit-compiled over a device mesh.

Loss: cross-entropy of the next token on labelled (assistant) tokens, in float32, averaged over
every labelled token of the step (all accumulation micro-batches together, so accumulation equals
one big batch); the same step trains on rows of text without vision (`text_batch`). The LM head
and the cross-entropy run `loss_chunk` tokens at a time, rematerialised in the backward pass, so
the [T, vocab] float32 logits never exist whole (`nll_sums`). Master
weights stay in `param_dtype` (float32 by default); the forward casts them to `compute_dtype`
(bfloat16 by default). With `freeze_vision` (the default) only the LM is differentiated and
optimized: the vision tower gets neither gradients nor optimizer state. Optimizer: global-norm
clipping, then AdamW (weight decay where `params.PARAM_RULES` says: on matrices and embeddings,
not on norms or biases) with linear warmup and cosine decay to 0; the vision tower, when trained,
may have its own peak learning rate (`vision_lr`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from svlm_jax.config import ModelConfig
from svlm_jax.model import text, vision, vlm
from svlm_jax.model.params import Model, Params, TextParams, map_param_tree, param_rule
from svlm_jax.train import sharding
from svlm_jax.train.data import IGNORE, vision_layouts


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    vision_lr: float = 0.0  # the vision tower's peak learning rate when it is trained; 0: lr
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the step (a jit static argument)."""

    model: ModelConfig
    optim: OptimConfig
    compute_dtype: str = "bfloat16"
    freeze_vision: bool = True
    remat: bool = True
    remat_policy: str = "full"  # what a rematerialised layer keeps for the backward pass: REMAT_POLICIES
    loss_chunk: int = 1024      # tokens per row whose logits exist at once

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: {', '.join(REMAT_POLICIES)}")
        if self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1, got {self.loss_chunk}")


# What each decoder layer keeps from the forward pass for the backward one when `remat` is on:
# "full" only its input (everything else is recomputed), "dots" also the outputs of its matmuls
# without batch dimensions (q/k/v/o projections and MLP; norms, rotary, attention and the activation
# are recomputed): more memory, less recomputation.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer updates done
    params: Params   # master weights
    opt_state: Any   # optax state of `trainable(params)`


@struct.dataclass
class Batch:
    """One step's data, leaves [A accumulation micro-batches, B examples, ...] (see data.pad_chunks);
    rows_abpv and layout are None in a batch of text rows (`text_batch`)."""

    ids_abt: jax.Array
    targets_abt: jax.Array
    positions_abt3: jax.Array
    segment_abt: jax.Array
    rows_abpv: jax.Array | None
    layout: vision.VisionLayout | None


def host_batch(cfg: ModelConfig, arrays: dict[str, np.ndarray]) -> Batch:
    """A data-pipeline element (numpy) -> Batch of numpy arrays, vision layouts added."""
    return Batch(ids_abt=arrays["ids_bt"], targets_abt=arrays["targets_bt"], positions_abt3=arrays["positions_bt3"],
                 segment_abt=arrays["segment_bt"], rows_abpv=arrays["rows_bpv"],
                 layout=vision_layouts(cfg.vision, arrays["grids_bg3"]))


def text_batch(rows_bt: np.ndarray, real_bt: np.ndarray, counted_bt: np.ndarray) -> Batch:
    """Rows of text without vision as a Batch of one micro-batch. Token rows [B, T+1] (real_bt [B, T+1]
    False on right padding) give the inputs rows[:, :-1] and, where counted_bt [B, T], the next tokens
    as targets (IGNORE elsewhere); positions 0.. on all three M-RoPE axes, as Qwen2-VL gives text."""
    b, t = rows_bt.shape[0], rows_bt.shape[1] - 1
    targets_bt = np.where(counted_bt, rows_bt[:, 1:], IGNORE).astype(np.int32)
    positions_bt3 = np.broadcast_to(np.arange(t, dtype=np.int32)[None, :, None], (b, t, 3))
    return Batch(ids_abt=rows_bt[None, :, :-1], targets_abt=targets_bt[None], positions_abt3=positions_bt3[None],
                 segment_abt=real_bt[None, :, :-1].astype(np.int32), rows_abpv=None, layout=None)


def schedule(cfg: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1),
                                              end_value=0.0)


def _decayed(tree):
    """Weight decay where PARAM_RULES says: on matrices and embeddings, not on norm weights or biases."""
    return map_param_tree(lambda path, _: param_rule(path).decayed, tree)


def _vision_leaves(tree):
    """True on the vision tower's leaves of a trainable tree (Params, or the LM's alone)."""
    if isinstance(tree, Params):
        return Params(vision=jax.tree.map(lambda _: True, tree.vision), text=jax.tree.map(lambda _: False, tree.text))
    return jax.tree.map(lambda _: False, tree)


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    # AdamW's update is lr * (normalized moment + weight_decay * w), linear in lr, so scaling the
    # vision tower's updates by vision_lr / lr gives it exactly its own peak learning rate.
    vision_scale = (cfg.vision_lr or cfg.lr) / cfg.lr
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_decayed),
                       optax.masked(optax.scale(vision_scale), _vision_leaves))


def trainable(spec: StepSpec, params: Params):
    return params.text if spec.freeze_vision else params


def with_trainable(spec: StepSpec, params: Params, part) -> Params:
    return params.replace(text=part) if spec.freeze_vision else part


def init_state(spec: StepSpec, params: Params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer(spec.optim).init(trainable(spec, params)))


def nll_sums(params: TextParams, hidden_btd, targets_bt, chunk: int):
    """(sum of the next-token cross-entropies where targets_bt != IGNORE, their count), float32.
    The tokens go `chunk` at a time (the last chunk padded): each chunk's logits [B, chunk, V] are
    made, reduced to its sum and, in the backward pass, made again (jax.checkpoint), so no more
    than one chunk's logits exists at once."""
    b, t, d = hidden_btd.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    hidden_nbcd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    targets_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def add_chunk(total, chunk_in):
        h_bcd, targets_bc = chunk_in
        logits_bcv = text.logits(params, sharding.constrain(h_bcd, sharding.BATCH_AXES))
        mask_bc = targets_bc != IGNORE
        picked_bc = jnp.take_along_axis(logits_bcv, jnp.where(mask_bc, targets_bc, 0)[..., None], axis=-1)[..., 0]
        nll_bc = jax.nn.logsumexp(logits_bcv, axis=-1) - picked_bc
        return total + jnp.sum(jnp.where(mask_bc, nll_bc, 0.0)), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), (hidden_nbcd, targets_nbc))
    return total, jnp.sum(targets_bt != IGNORE).astype(jnp.float32)


def loss_sums(spec: StepSpec, params: Params, ids_bt, targets_bt, positions_bt3, segment_bt, rows_bpv, layout_b):
    """(sum of next-token cross-entropies over labelled tokens, their count), float32."""
    cfg = spec.model
    p = jax.tree.map(lambda x: x.astype(spec.compute_dtype), params)
    # The embedding is looked up with its "embed" axis whole, so the embeddings come out split by example.
    p = p.replace(text=p.text.replace(embed_vd=sharding.constrain_gathered("text.embed_vd", p.text.embed_vd)))
    model = Model(cfg, p)
    deepstack_sbtd = None  # Qwen3-VL's DeepStack features, with vision
    if rows_bpv is None:  # text rows
        x_btd = vlm.embed(model, ids_bt)
    else:
        # Each example has its own vision layout (its grids plus a padding grid), so embed per example.
        x_b1td, deepstack_bs1td = jax.vmap(lambda ids_t, rows_pv, layout: vlm.embed_with_deepstack(
            model, ids_t[None], rows_pv, layout))(ids_bt, rows_bpv, layout_b)
        x_btd = x_b1td[:, 0]
        if deepstack_bs1td is not None:
            deepstack_sbtd = jnp.swapaxes(deepstack_bs1td[:, :, 0], 0, 1)
    x_btd = sharding.constrain(x_btd, sharding.BATCH_AXES)
    hidden = text.decode_hidden(cfg.text, p.text, x_btd, positions_bt3, segment_bt, None,
                                deepstack_sbtd=deepstack_sbtd, remat=spec.remat,
                                remat_policy=REMAT_POLICIES[spec.remat_policy])
    return nll_sums(p.text, hidden, targets_bt, spec.loss_chunk)


def batch_sums(spec: StepSpec, params: Params, batch: Batch):
    """(sum of the losses of every labelled token of a whole Batch, their count), no gradient."""
    def micro(carry, mb):
        s, n = loss_sums(spec, params, *mb)
        return (carry[0] + s, carry[1] + n), None
    (s, n), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), _micro_batches(batch))
    return s, n


def batch_loss(spec: StepSpec, params: Params, batch: Batch):
    """Mean loss over the labelled tokens of a whole Batch (no gradient): for evaluation and tests."""
    s, n = batch_sums(spec, params, batch)
    return s / jnp.maximum(n, 1.0)


def _micro_batches(batch: Batch):
    return (batch.ids_abt, batch.targets_abt, batch.positions_abt3, batch.segment_abt, batch.rows_abpv, batch.layout)


def train_step(spec: StepSpec, state: TrainState, batch: Batch):
    """One update from all micro-batches of `batch`: (new state, metrics {loss, grad_norm, lr, labelled_tokens})."""
    part = trainable(spec, state.params)

    def micro(carry, mb):
        grads_acc, loss_acc, n_acc = carry
        (loss_sum, n), grads = jax.value_and_grad(
            lambda t: loss_sums(spec, with_trainable(spec, state.params, t), *mb), has_aux=True)(part)
        return (jax.tree.map(jnp.add, grads_acc, grads), loss_acc + loss_sum, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, part)
    (grads, loss_sum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), _micro_batches(batch))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer(spec.optim).update(grads, state.opt_state, part)
    params = with_trainable(spec, state.params, optax.apply_updates(part, updates))
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(spec.optim)(state.step), "labelled_tokens": n}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def state_shardings(spec: StepSpec, params: Params, mesh: Mesh):
    """Shardings of the TrainState that `init_state(spec, params)` makes."""
    return sharding.tree_shardings(jax.eval_shape(functools.partial(init_state, spec), params), mesh)


def sharded_state(spec: StepSpec, params: Params, mesh: Mesh) -> TrainState:
    """init_state laid out on the mesh (parameters are placed first, so nothing is ever whole on one device)."""
    shardings = state_shardings(spec, params, mesh)
    params = jax.device_put(params, shardings.params)
    return jax.jit(functools.partial(init_state, spec), out_shardings=shardings)(params)


def compile_step(spec: StepSpec, mesh: Mesh, shardings):
    """`train_step` jitted over `mesh`: state in and out with `shardings` (donated), batch split over
    the data-parallel axes, metrics replicated."""
    return jax.jit(functools.partial(sharding.on_mesh(mesh, train_step), spec),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)


def compile_eval(spec: StepSpec, mesh: Mesh, param_shardings):
    """`batch_sums` jitted over `mesh`: params with `param_shardings`, batch split over the
    data-parallel axes, the two sums replicated."""
    return jax.jit(functools.partial(sharding.on_mesh(mesh, batch_sums), spec),
                   in_shardings=(param_shardings, sharding.batch_sharding(mesh)), out_shardings=sharding.replicated(mesh))
