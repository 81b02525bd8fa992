"""Joining a multi-process run: JAX's distributed runtime, started once per process before jax
touches a device (`svlm train` and `svlm stream` call `initialize` first thing).

A process joins in one of two ways:
  explicit  `--coordinator HOST:PORT --num-processes N --process-id I` in every process; process 0
            serves the coordinator at HOST:PORT, which the others must reach
  cluster   `--cluster`: the cluster's own environment gives the three (SLURM, Open MPI, Kubernetes,
            Cloud TPU: whatever `jax.distributed.initialize()` detects)
With neither, the process runs alone. The mesh then spans every process's devices (`jax.devices()`);
each process feeds and reads its own devices' part. On CPUs the processes talk through Gloo
collectives (jax's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import argparse
import dataclasses


class DistributedError(ValueError):
    """The launch settings are unusable, or the process could not join the run."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a run (see the module docstring); the default: alone."""

    coordinator: str | None = None  # "HOST:PORT" of process 0's coordinator service
    num_processes: int | None = None
    process_id: int | None = None
    cluster: bool = False

    def __post_init__(self):
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if self.cluster and any(x is not None for x in explicit):
            raise DistributedError("--cluster takes the coordinator, process count and id from the cluster's "
                                   "environment: give it without --coordinator, --num-processes, --process-id")
        if any(x is None for x in explicit) and any(x is not None for x in explicit):
            raise DistributedError("give all three of --coordinator HOST:PORT, --num-processes N and --process-id I "
                                   "(or none of them)")
        if self.coordinator is None:
            return
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise DistributedError(f"--coordinator must be HOST:PORT (a port in 1..65535), got {self.coordinator!r}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise DistributedError(f"need --num-processes >= 1 and 0 <= --process-id < --num-processes, got "
                                   f"{self.num_processes} and {self.process_id}")

    @property
    def alone(self) -> bool:
        return not self.cluster and self.coordinator is None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that can run over several processes (`launch_from_args` reads them)."""
    group = parser.add_argument_group("several processes (one per host; see svlm_jax/distributed.py)")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="address of process 0, which serves the coordinator there (with --num-processes "
                            "and --process-id)")
    group.add_argument("--num-processes", metavar="N", type=int, default=None, help="processes in the run")
    group.add_argument("--process-id", metavar="I", type=int, default=None, help="this process's id, 0 .. N-1")
    group.add_argument("--cluster", action="store_true",
                       help="take the three from the cluster's environment (SLURM, Open MPI, Kubernetes, "
                            "Cloud TPU), as jax.distributed.initialize() detects it")


def launch_from_args(args: argparse.Namespace) -> Launch:
    return Launch(args.coordinator, args.num_processes, args.process_id, args.cluster)


def initialize(launch: Launch) -> None:
    """Start JAX's distributed runtime as `launch` says (nothing when the process runs alone, or when
    the runtime is already started). Blocks until every process has joined."""
    if launch.alone:
        return
    import jax  # here, not at import time: `svlm --help` stays fast

    if jax.distributed.is_initialized():
        return
    try:
        if launch.cluster:
            jax.distributed.initialize()
        else:
            # "deactivate": exactly these three, no cluster variable overriding them or the visible devices
            jax.distributed.initialize(launch.coordinator, launch.num_processes, launch.process_id,
                                       cluster_detection_method="deactivate")
    except (RuntimeError, ValueError) as e:  # no cluster found, coordinator unreachable, timeout
        where = "from the cluster's environment" if launch.cluster else f"at {launch.coordinator}"
        raise DistributedError(f"could not join the distributed run {where}: {e}") from None
