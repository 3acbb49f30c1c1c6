"""Peak resident memory per process while 2 gloo processes start an FSDP2 stage from ``init_from``.

A 1B-scale model (a Llama of ``--layers`` x ``--hidden``, 0.84B parameters by default,
with a small EVA02 tower) is saved once to ``WORKDIR/init.safetensors``; then the stage starts
twice on 2 CPU processes with ``FSDP2Strategy``, trains one step on a short text row, and every
process reports its peak resident set size (``ru_maxrss``) at the start of training, i.e. after
building, sharding and loading:

- ``init_on_meta: false``: every process builds the whole fp32 model, reads the whole file,
  then shards (the start-up before this change);
- ``init_on_meta: true`` (the default): the vision tower and the LLM are built without
  parameter memory, sharded, and the file is read tensor by tensor into each process's shard.

``--compare-with DIR`` also starts the stage with the code of another checkout (e.g. ``git
worktree add /tmp/before 491bfbb``, the code before this start-up), which builds whole and
reads the whole file into every process.

Run: python benchmarks/startup_memory.py [--workdir runs/startup-memory] [--layers 16] [--compare-with DIR]
It needs about 2 x 2 x the model's fp32 size of free memory for the first case (15 GB at 1B).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import timedelta

import torch

HERE = os.path.abspath(__file__)


def architecture(layers: int, hidden: int):
    from kangaroo.modules import KangarooConfig, LanguageModelConfig, PatchifyConfig, VisionTowerConfig
    from kangaroo.modules.sizes import TINY_VISUAL_TOKENS

    return KangarooConfig(
        vision_tower=VisionTowerConfig("timm:eva02_tiny_patch14_224", image_size=28,
                                       timm_kwargs={"depth": 2, "global_pool": "token"}),
        language_model=LanguageModelConfig(transformers_config={
            "model_type": "llama", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": int(hidden * 2.6875),
            "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 512,
            "tie_word_embeddings": False}),
        visual_tokens=TINY_VISUAL_TOKENS,
        patchify=PatchifyConfig(kernel=(2, 2, 2)),
    )


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from kangaroo.modules import IGNORE_INDEX
    from kangaroo.training.fsdp import FSDP2Strategy
    from kangaroo.training.stage import KangarooStage

    class PeakAtStart(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as handle:
                json.dump({"peak_gb": peak_gb, "seconds": time.time() - args.started}, handle)

    ids = torch.randint(1, 1000, (1, 16))
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16).unsqueeze(0)}
    stage = KangarooStage(architecture(args.layers, args.hidden),
                          trainable={"vision_tower": False, "patchify": True, "projector": True, "language_model": True},
                          init_from=args.init_from, new_parts=["patchify"], export_weights=False)
    options = {} if args.init_on_meta < 0 else {"init_on_meta": bool(args.init_on_meta)}  # < 0: older code
    strategy = FSDP2Strategy(timeout=timedelta(minutes=10), **options)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[PeakAtStart()], default_root_dir=args.out)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/startup-memory")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--compare-with", help="a checkout of older code to start the stage with too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--init-from", help=argparse.SUPPRESS)
    parser.add_argument("--init-on-meta", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from kangaroo.modules import build_kangaroo
    from kangaroo.training.weights import save_weights

    os.makedirs(args.workdir, exist_ok=True)
    init = os.path.join(args.workdir, f"init-{args.layers}x{args.hidden}.safetensors")
    if not os.path.exists(init):
        model = build_kangaroo(architecture(args.layers, args.hidden))
        model.patchify = None  # the file of a stage before patchify: it is the new part
        save_weights(model, init)
        del model
    size_gb = os.path.getsize(init) / 2**30
    print(f"init_from: {init} ({size_gb:.2f} GB fp32)")
    runs = [(0, "build whole, read per tensor, shard (`init_on_meta: false`)", None),
            (1, "skeleton, shard, read per tensor into the shards (`init_on_meta: true`)", None)]
    if args.compare_with:
        runs.insert(0, (-1, f"code in {args.compare_with}", os.path.abspath(args.compare_with)))
    results = {}
    for on_meta, label, source in runs:
        out = os.path.join(args.workdir, f"init_on_meta={on_meta}")
        os.makedirs(out, exist_ok=True)
        command = [sys.executable, HERE, "--worker", "--init-from", os.path.abspath(init), "--init-on-meta",
                   str(on_meta), "--layers", str(args.layers), "--hidden", str(args.hidden),
                   "--out", os.path.abspath(out), "--started", str(time.time())]
        env = dict(os.environ, PYTHONPATH=source) if source else None
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=source)
        if result.returncode != 0:
            sys.exit(f"{label} failed:\n{result.stderr[-3000:]}")
        results[on_meta] = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    print("\n| start-up (2 gloo processes, FSDP2) | peak RSS rank 0 | peak RSS rank 1 | start to first step |")
    print("|---|---|---|---|")
    for on_meta, label, _ in runs:
        ranks = results[on_meta]
        print(f"| {label} | {ranks[0]['peak_gb']:.2f} GB | {ranks[1]['peak_gb']:.2f} GB | "
              f"{max(r['seconds'] for r in ranks):.0f} s |")
    first = min(results)
    ratio = max(r["peak_gb"] for r in results[1]) / max(r["peak_gb"] for r in results[first])
    print(f"\nlean start / {runs[0][1]}, largest process: {ratio:.2f} (model file {size_gb:.2f} GB)")


if __name__ == "__main__":
    main()
