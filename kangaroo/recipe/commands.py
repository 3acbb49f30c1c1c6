"""Entries of ``kangaroo recipe``: ``run`` and ``show``.

Typed functions that ``kangaroo.cli`` registers through jsonargparse (flags, ``--help``,
``--config`` and ``--print_config`` from the signature and docstring); each returns the exit code.
"""

from __future__ import annotations

import os
import sys

from kangaroo import storage


def _workdir(recipe, workdir: str | None) -> str:
    return workdir or recipe.workdir or os.path.join("runs", recipe.name)


def run(recipe: str, *, workdir: str | None = None, only: str | None = None, until: str | None = None,
        restart_from: str | None = None, prepare_workers: int = 1, rehearse: bool = False, devices: int | None = None,
        num_nodes: int | None = None, node_rank: int | None = None, coordinator_port: int | None = None,
        node_timeout: float = 120.0, with_: list[str] | None = None) -> int:
    """Run the stages in order; re-running skips done stages and resumes.

    On several nodes, start the same command on every node: node 0 leads, the others follow it
    stage by stage (docs/training.md, Several machines).

    Args:
        recipe: a recipe file (recipes/*.yaml)
        workdir: where stages, state and summary go (default: the recipe's workdir)
        only: run this stage alone (its init_from must be done)
        until: run up to and including this stage
        restart_from: redo this stage and every later one
        prepare_workers: processes for data preparation
        rehearse: run the recipe's own stage files at tiny scale on CPU processes: tiny models, a small
            synthetic world, few steps (every change printed)
        devices: processes of a rehearsal (default 2)
        num_nodes: nodes of the allocation (default: SLURM_NNODES, else 1); each stage's fit gets
            trainer.num_nodes
        node_rank: this node's rank (default: NODE_RANK, else SLURM_NODEID)
        coordinator_port: where node 0's runner listens for the others (default: MASTER_PORT + 1)
        node_timeout: seconds without a sign of life after which a node counts as dead and the stage stops
            on every node
        with_: optional stages to run too (--with preference): by name, or by name without its number
    """
    from kangaroo.recipe import NodeSetup, Preempted, load_recipe, run_recipe
    from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE

    if only and until:
        raise ValueError("give --only or --until, not both")
    path = recipe
    spec = load_recipe(path).selected(with_)
    if rehearse:
        from kangaroo.recipe.rehearsal import rehearsal

        workdir = workdir or os.path.join("runs", f"{spec.name}-rehearsal")
        spec, notes = rehearsal(spec, devices=devices or 2, world=os.path.join(workdir, "world"))
        print(f"rehearsal of {path} on {devices or 2} CPU processes, in {workdir}; what it changes "
              "in the stage files:")
        print("\n".join(f"  {note}" for note in notes), flush=True)
    elif devices:
        raise ValueError("--devices goes with --rehearse (a recipe's own stages name their devices)")
    nodes = NodeSetup.from_environment(num_nodes, node_rank, coordinator_port, node_timeout)
    try:
        summary = run_recipe(spec, _workdir(spec, workdir), only=only, until=until, restart_from=restart_from,
                             prepare_workers=prepare_workers, nodes=nodes)
    except Preempted as err:
        print(f"kangaroo: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except Exception as err:
        outage = storage.unreachable_store(err)
        if outage is None and not isinstance(err, RuntimeError):
            raise
        print(f"kangaroo: error: {outage or err}", file=sys.stderr)
        return 1
    return 0 if summary else 1


def show(recipe: str, *, workdir: str | None = None, with_: list[str] | None = None) -> int:
    """Print every stage fully resolved (configs merged).

    Args:
        recipe: a recipe file (recipes/*.yaml)
        workdir: where the recipe's stages go (default: the recipe's workdir)
        with_: optional stages to show too (--with preference)
    """
    from kangaroo.recipe import load_recipe, show_recipe

    spec = load_recipe(recipe).selected(with_)
    print(show_recipe(spec, storage.absolute(_workdir(spec, workdir))))
    return 0
