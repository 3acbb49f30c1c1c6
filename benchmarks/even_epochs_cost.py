"""What evening the epochs costs: the share of empty micro-batches per epoch, by process count.

Every process runs as many micro-batches in an epoch as the longest share, rounded up to a
multiple of the accumulation window (``kangaroo.data.even_epochs``); the empty micro-batches are
the compute this costs. This prints, for a prepared dataset at a stage's budget, the rows per
process, the empty micro-batches and their share of the epoch, for several process counts and
windows (the same plan ``kangaroo data stats`` prints: the loaders' own packing, on token counts).

    python benchmarks/even_epochs_cost.py runs/kangaroo-tiny/data/4-instruction-tuning/train \
        --config configs/kangaroo-tiny/4-instruction-tuning.yaml --rows-per-batch 1
"""

from __future__ import annotations

import argparse

from kangaroo.data.stats import cached_record_tokens, epoch_plan
from kangaroo.training.stage_file import load_stage_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="prepared training data")
    parser.add_argument("--config", required=True, help="the stage file (budget, packing, buffer, workers)")
    parser.add_argument("--rows-per-batch", type=int, help="default: the stage's")
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 4, 16], help="accumulate_grad_batches")
    args = parser.parse_args()
    hp = load_stage_file(args.config, ("data",))["data"].hparams
    rows_per_batch = args.rows_per_batch or hp.rows_per_batch
    tokens = cached_record_tokens(args.directory)
    print(f"{args.directory}: {len(tokens)} records, budget {hp.max_tokens}, {rows_per_batch} row(s) per micro-batch")
    print(f"{'processes':>9} {'window':>6} {'rows per process':>24} {'micro-batches':>13} {'empty':>6} {'share':>7}")
    for processes in args.processes:
        for window in args.windows:
            plan = epoch_plan(args.directory, hp.max_tokens, packing=hp.packing, rows_per_batch=rows_per_batch,
                              buffer_size=hp.buffer_size, shuffle=hp.shuffle, seed=hp.seed,
                              num_workers=hp.num_workers, processes=processes, accumulate=window, tokens=tokens)
            total = plan.micro_batches_per_process * processes
            rows = "/".join(map(str, plan.rows))
            print(f"{processes:>9} {window:>6} {rows:>24} {total:>13} {plan.empty_micro_batches:>6} "
                  f"{plan.empty_micro_batches / total:>7.2%}")


if __name__ == "__main__":
    main()
