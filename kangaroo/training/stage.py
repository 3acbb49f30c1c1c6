"""One curriculum stage as a LightningModule: build, freeze, initialise, optimise, evaluate."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from kangaroo import storage
from kangaroo.distributed import per_rank, rank_and_size
from kangaroo.modules.builder import SKELETON_PARTS, KangarooConfig, build_kangaroo
from kangaroo.modules.adapters import ADAPTER_MARK, AdapterConfig, add_adapters, check_device, merged_state_dict
from kangaroo.modules.language_model import position_limit
from kangaroo.training.freezing import apply_trainable, check_trainable_spec, format_table
from kangaroo.modules.model import PART_NAMES, KangarooModel
from kangaroo.modules.precision import cast_model
from kangaroo.training.optim import OptimizerConfig, parameter_groups, warmup_cosine
from kangaroo.training.preference import METRICS as PREFERENCE_METRICS
from kangaroo.training.preference import PreferenceConfig, adapters_off, pair_terms
from kangaroo.training.weights import WEIGHTS_NAME, load_weights, save_state_dict, save_weights, write_adapters
from kangaroo.training.fsdp import FSDP2Strategy, full_state_dict, is_sharded, materialize

log = logging.getLogger(__name__)

METRICS_NAME = "stage-metrics.json"
MODEL_INPUTS = ("input_ids", "position_ids", "pixel_values", "timestamps", "frame_counts")


class KangarooStage(L.LightningModule):
    """A curriculum stage of the Kangaroo model.

    Args:
        architecture: the model (parts, sizes, pretrained sources).
        trainable: part -> bool for every part with parameters, e.g.
            ``{vision_tower: true, projector: true, language_model: false}``.
        trainable_patterns: glob on parameter names -> bool, applied after ``trainable`` in
            order, for finer control (``language_model.model.embed_tokens.*: true``).
        init_from: weights of the previous stage (a safetensors file, a folder holding
            ``model.safetensors`` or a weights-only checkpoint); loaded strictly.
        new_parts: parts this stage introduces, allowed to be absent from ``init_from``
            (``[patchify]`` in stage 3; they keep their own initialisation).
        load_pretrained: read the pretrained vision tower and LLM named in ``architecture``
            (stage 1); ignored when ``init_from`` is set.
        optimizer: AdamW, layer-wise LR decay and the warm-up/cosine schedule.
        accuracy_groups: manifest categories whose multiple-choice accuracy is logged apart
            (``val/accuracy/<group>``), next to the overall ``val/accuracy``.
        export_weights: at the end of ``fit``, write the model's weights to
            ``<trainer.default_root_dir>/model.safetensors`` for the next stage (adapters
            folded in: the file has the names of a model without them; the adapters alone
            beside it in ``adapters.safetensors`` and ``adapters.json``).
        adapters: part -> LoRA adapters (``{language_model: {kind: lora, r: 64, alpha: 128,
            target_modules: [q_proj, v_proj]}}``, through peft). The part's own weights stay
            frozen (its ``trainable`` entry must be false) and its adapters train; checkpoints
            then hold only what trains (the frozen weights come back from ``init_from`` or the
            pretrained sources on a resume).
        preference: train on preference pairs with DPO instead of next-token prediction
            (``{beta: 0.1}``; ``kangaroo.training.preference``). The reference is the model the
            stage starts from: with adapters, the model with its adapters off (nothing else may
            train then); without, a frozen copy (not under FSDP2).
    """

    def __init__(
        self,
        architecture: KangarooConfig,
        trainable: dict[str, bool],
        trainable_patterns: dict[str, bool] | None = None,
        init_from: str | None = None,
        new_parts: list[str] | None = None,
        load_pretrained: bool = False,
        optimizer: OptimizerConfig | None = None,
        accuracy_groups: list[str] | None = None,
        export_weights: bool = True,
        adapters: dict[str, AdapterConfig] | None = None,
        preference: PreferenceConfig | None = None,
    ) -> None:
        super().__init__()
        check_trainable_spec(trainable, trainable_patterns)
        unknown = sorted(set(new_parts or ()) - set(PART_NAMES))
        if unknown:
            raise ValueError(f"new_parts: unknown part(s) {unknown}; parts are {list(PART_NAMES)}")
        self.architecture = architecture
        self.trainable = dict(trainable)
        self.trainable_patterns = dict(trainable_patterns or {})
        self.init_from = init_from
        self.new_parts = list(new_parts or [])
        self.load_pretrained = load_pretrained
        self.optim = optimizer or OptimizerConfig()
        self.accuracy_groups = list(accuracy_groups or [])
        self._rng_to_restore: dict[str, Any] | None = None
        self.export_weights = export_weights
        self.adapters = dict(adapters or {})
        unknown = sorted(set(self.adapters) - set(PART_NAMES))
        if unknown:
            raise ValueError(f"adapters: unknown part(s) {unknown}; parts are {list(PART_NAMES)}")
        trained = sorted(name for name in self.adapters if self.trainable.get(name))
        if trained:
            raise ValueError(f"adapters on {trained}, which `trainable` also trains whole: a part with adapters keeps "
                             "its own weights frozen; set its trainable entry to false")
        if self.adapters:
            self.strict_loading = False  # a checkpoint holds only what trains (on_save_checkpoint)
        self.preference = preference
        if preference is not None and self.adapters and (any(self.trainable.values())
                                                         or any(self.trainable_patterns.values())):
            raise ValueError("preference with adapters: the reference is the model with its adapters off, which is "
                             "the stage's start only when nothing but the adapters trains; set every trainable "
                             "entry (and pattern) to false")
        object.__setattr__(self, "_reference", None)  # a frozen copy, for preference without adapters
        self.preference_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in PREFERENCE_METRICS})
        self.model: KangarooModel | None = None
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.group_accuracy = torch.nn.ModuleDict({g: MeanMetric() for g in self.accuracy_groups})
        self._step_started = 0.0
        self._shown_loss = torch.tensor(float("nan"))
        self._window: torch.Tensor | None = None  # (loss sum, label count) of the running accumulation window
        self.trainable_rows: list[dict] = []
        self.loss_history: list[tuple[int, float]] = []

    # -- building ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Builds the model once (Lightning may call this again, e.g. before a test run),
        loads ``init_from`` and applies the trainable spec."""
        if self.model is not None:
            return
        on_meta = torch.empty(0).device.type == "meta"  # a shape-only build (model summary)
        load_pretrained = self.load_pretrained and self.init_from is None and not on_meta
        strategy = self._trainer.strategy if self._trainer is not None else None
        sharded = isinstance(strategy, FSDP2Strategy)
        # Under FSDP2 with init_from: the vision tower and the LLM are built without parameter
        # memory, sharded, and only then filled from the file, shard by shard, so that no
        # process ever holds the whole model (nor the whole file beside it).
        check_device(self.adapters, strategy.root_device if strategy is not None else torch.device("cpu"))
        # (with adapters the model is built whole: they wrap its layers before they are sharded)
        lean = (sharded and strategy.init_on_meta and self.init_from is not None and not on_meta
                and not set(self.new_parts) & set(SKELETON_PARTS) and not self.adapters)
        model = build_kangaroo(self.architecture, load_weights=load_pretrained, skeleton=lean)
        longest = self._longest_sample()
        if longest is not None:  # before init_from is read: a long wait for an error otherwise
            check_positions(*longest, position_limit(model.language_model.config))
        if self.init_from is not None and not on_meta and not lean:
            loaded = load_weights(model, self.init_from, self.new_parts)
            log.info("initialised from %s (new parts kept as built: %s)", self.init_from, loaded["new"] or "none")
        if self.preference is not None and not self.adapters and not on_meta:
            if sharded:
                raise ValueError("preference without adapters keeps a frozen copy of the model as its reference, "
                                 "which FSDP2 would not shard: train the pairs with adapters (the reference is then "
                                 "the model with its adapters off), with DDP or on one process")
            reference = copy.deepcopy(model).eval().requires_grad_(False)
            object.__setattr__(self, "_reference", reference)  # not a submodule: not trained, not checkpointed
        if self.adapters:  # after init_from: adapters rename the layers they wrap
            add_adapters(model, self.adapters)
        self.trainable_rows = apply_trainable(model, self.trainable, self.trainable_patterns)
        model.train()  # from_pretrained hands back eval mode
        if sharded:
            strategy.parallelize(model)
            if lean:
                count = materialize(model, strategy.root_device)
                loaded = load_weights(model, self.init_from, self.new_parts)
                log.info("initialised from %s into the shards of %d tensors (new parts kept as built: %s)",
                         self.init_from, count, loaded["new"] or "none")
        elif isinstance(strategy, ModelParallelStrategy):
            raise TypeError("use kangaroo.training.fsdp.FSDP2Strategy as the trainer strategy: it knows how to shard "
                            f"this model (got {type(strategy).__name__}, which would leave it unsharded)")
        elif strategy is not None and strategy.world_size > 1:
            model.always_run_vision = True  # DDP: text-only ranks still produce the tower's gradients
        self.model = model

    def _longest_sample(self) -> tuple[int, str] | None:
        """The most positions one sample of the stage's data can reach, by its data module's
        budgets: ``data.prepare.max_tokens`` (every prepared sample fits it) within the row's
        ``data.max_tokens``; None for a data module without them."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hparams = getattr(datamodule, "hparams", None) or {}
        row = hparams.get("max_tokens")
        prepare = getattr(getattr(datamodule, "prepare", None), "max_tokens", None)
        if prepare is not None and (row is None or prepare <= row):
            return int(prepare), "data.prepare.max_tokens lets a sample reach"
        return (int(row), "data.max_tokens lets a sample reach") if row is not None else None

    def on_fit_start(self) -> None:
        rank_zero_info(f"trainable parts:\n{format_table(self.trainable_rows)}")

    # -- training ----------------------------------------------------------------------------

    def _forward(self, batch: dict[str, Any], first_answers: bool = False, sample_logprobs: bool = False,
                 model: torch.nn.Module | None = None):
        # through the model's forward: a sharded model gathers its weights around that call
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return (model or self.model)(**inputs, labels=batch["labels"], first_answers=first_answers,
                                     sample_logprobs=sample_logprobs)

    @torch.no_grad()
    def _reference_logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's summed log-probability of each sample (see ``preference``), in eval
        mode (no dropout)."""
        if self.adapters:
            training = self.model.training
            self.model.eval()
            try:
                with adapters_off(self.model):
                    return self._forward(batch, sample_logprobs=True).sample_logprobs
            finally:
                self.model.train(training)
        reference = self._reference
        parameter = next(self.model.parameters())
        if next(reference.parameters()).device != parameter.device:
            reference.to(parameter.device)
        if next(reference.parameters()).dtype != parameter.dtype:  # not a submodule: precision plugins skip it
            cast_model(reference, parameter.dtype)
        return self._forward(batch, sample_logprobs=True, model=reference).sample_logprobs

    def _pairs(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-pair terms of the batch (``pair_terms``) and the policy's loss output."""
        output = self._forward(batch, sample_logprobs=True)
        terms = pair_terms(output.sample_logprobs, self._reference_logprobs(batch), output.sample_label_counts,
                           self.preference)
        if terms["loss"].shape[0] != batch.get("pairs", 0):
            raise RuntimeError(f"{batch.get('pairs', 0)} pairs in the batch but {terms['loss'].shape[0]} scored")
        return terms, output.loss_sum

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after a resume draws what it would have
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        self._step_started = time.perf_counter()

    def _refuse_pairs(self, batch: dict[str, Any]) -> None:
        if self.preference is None and batch.get("pairs"):
            raise ValueError(f"the batch holds {batch['pairs']} preference pairs (records with a rejected reply), "
                             "but the stage has no model.preference: it would learn the rejected replies too; "
                             "set model.preference, or prepare data without pairs")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self._refuse_pairs(batch)
        if self.preference is not None:
            # the loss of an optimizer step: the mean over its pairs, weighed as tokens are below
            terms, loss_sum = self._pairs(batch)
            loss = terms["loss"].sum() + loss_sum * 0.0  # connected when the micro-batch holds no pair
            sums = torch.stack([loss.detach().float(), torch.tensor(float(terms["loss"].shape[0]), device=loss.device),
                                *[terms[name].sum().float() for name in PREFERENCE_METRICS[1:]]])
            self._window = sums if self._window is None else self._window + sums
            return loss
        output = self._forward(batch)
        # The loss of an optimizer step is the sum over every labelled token of every
        # micro-batch on every process, divided by the step's total count of them. That count
        # is known only once the accumulation window has run, so each micro-batch returns its
        # plain sum and ``on_before_optimizer_step`` scales the accumulated gradients by
        # ``accumulate * world / total`` (Lightning divides each returned loss by
        # ``accumulate_grad_batches``; DDP and FSDP2 average gradients over processes). A
        # micro-batch holding one answer token weighs one token, not one micro-batch.
        sums = torch.stack([output.loss_sum.detach().float(), output.num_label_tokens.detach().float()])
        self._window = sums if self._window is None else self._window + sums
        if "packing_efficiency" in batch:
            rows = batch["input_ids"].shape[0]
            self.log("train/packing_efficiency", float(batch["packing_efficiency"]), batch_size=rows)
        return output.loss_sum

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Normalises the gradients of the accumulation window (see ``training_step``) and logs
        the step's loss; every process runs it once per optimizer step (one all-reduce)."""
        size = 2 if self.preference is None else 1 + len(PREFERENCE_METRICS)
        totals = self._window if self._window is not None else torch.zeros(size, device=self.device)
        self._window = None
        world = self.trainer.world_size
        if world > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, tokens = totals[0], totals[1].clamp(min=1)  # tokens: pairs, for a preference stage
        scale = self.trainer.accumulate_grad_batches * world / float(tokens)
        for parameter in self.model.parameters():
            if parameter.grad is not None:  # sharded (DTensor) gradients under FSDP2
                parameter.grad.mul_(scale)
        shown = (loss_sum / tokens).detach()
        self.log("train/loss", shown, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if self.preference is None:
            self.log("train/label_tokens", totals[1], on_step=True, on_epoch=False, batch_size=1)
        else:
            self.log("train/pairs", totals[1], on_step=True, on_epoch=False, batch_size=1)
            for name, total in zip(PREFERENCE_METRICS[1:], totals[2:]):
                self.log(f"train/{name}", total / tokens, on_step=True, on_epoch=False, batch_size=1)
        self._shown_loss = shown.cpu()

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        rows = batch["input_ids"].shape[0]
        # one entry per optimizer step (the window's loss, see ``on_before_optimizer_step``):
        # the history, stored in every checkpoint, grows with the steps, not the micro-batches
        recorded = self.loss_history[-1][0] if self.loss_history else 0
        if outputs is not None and self.global_step > recorded:
            self.loss_history.append((self.global_step, float(self._shown_loss)))
        if elapsed > 0 and "num_tokens" in batch:
            self.log("train/tokens_per_s", batch["num_tokens"] / elapsed, prog_bar=True, batch_size=rows)
        for index, group in enumerate(self.optimizers().optimizer.param_groups):
            self.log(f"lr/{group.get('name', index)}", group["lr"], batch_size=rows)

    # -- evaluation --------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._refuse_pairs(batch)
        if self.preference is not None:
            terms, _ = self._pairs(batch)
            if terms["loss"].numel():
                for name, metric in self.preference_metrics.items():
                    metric.update(terms[name].detach())
            return
        output = self._forward(batch, first_answers=True)
        loss_sum, count = output.loss_sum, output.num_label_tokens
        if count > 0:
            self.val_loss.update(loss_sum / count, weight=count)
        predicted, target = output.answers
        tasks = batch.get("tasks") or [""] * len(predicted)
        groups = batch.get("categories") or [""] * len(predicted)
        if len(tasks) != len(predicted):
            raise RuntimeError(f"{len(tasks)} samples in the batch but {len(predicted)} answered")
        correct = (predicted == target).float()
        # dtype given: a batch without samples (another process's filler, see EvenBatches) has none
        mcq = torch.tensor([t == "mcq" for t in tasks], dtype=torch.bool, device=correct.device)
        if mcq.any():
            self.val_accuracy.update(correct[mcq])
        for name, metric in self.group_accuracy.items():
            chosen = mcq & torch.tensor([g == name for g in groups], dtype=torch.bool, device=correct.device)
            if chosen.any():
                metric.update(correct[chosen])

    def on_validation_epoch_end(self) -> None:
        # MeanMetric syncs across processes in compute(); an empty metric gives nan, so a
        # held-out set without questions shows up as nan instead of a made-up number.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*called before the ``update``")
            if self.preference is not None:
                for name, metric in self.preference_metrics.items():
                    self.log(f"val/{name}", metric.compute(), prog_bar=name in ("loss", "preference_accuracy"))
                    metric.reset()
                return
            self.log("val/loss", self.val_loss.compute(), prog_bar=True)
            self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
            for name, metric in self.group_accuracy.items():
                self.log(f"val/accuracy/{name}", metric.compute())
        for metric in (self.val_loss, self.val_accuracy, *self.group_accuracy.values()):
            metric.reset()

    # -- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(self.model, self.optim)
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        total = self.trainer.max_steps
        if total is None or total < 1:
            raise ValueError("trainer.max_steps or data.epochs must be set: the cosine schedule needs the stage's "
                             "length (the streams have no epoch length of their own)")
        warmup, min_ratio = self.optim.warmup_steps, self.optim.min_lr / self.optim.lr
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- handing over to the next stage ------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["loss_history"] = [list(item) for item in self.loss_history]
        # Random states (torch, CUDA, numpy, Python) of this process, so that anything random
        # after a resume (dropout, drop path) draws what the uninterrupted run drew.
        checkpoint["rng_states"] = per_rank(rng_states())  # one entry per process
        if self.adapters and not is_sharded(self.model):
            # only what trains: the frozen weights are rebuilt from their sources on a resume (a
            # sharded checkpoint keeps them: torch's distributed load asks for every key the model has)
            kept = {f"model.{name}" for name, parameter in self.model.named_parameters() if parameter.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in kept or not k.startswith("model.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.adapters and self.model is not None and "state_dict" in checkpoint:  # strict_loading is off: check what strict would
            saved = {k for k in checkpoint.get("state_dict", {}) if k.startswith("model.")}
            trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            known = {f"model.{n}" for n in self.model.state_dict()}
            missing, unknown = sorted(trained - saved), sorted(saved - known)
            if missing or unknown:
                raise ValueError(f"the checkpoint does not match this stage's adapters: missing {missing[:5]} "
                                 f"({len(missing)}), not in the model {unknown[:5]} ({len(unknown)})")
        self.loss_history = [tuple(item) for item in checkpoint.get("loss_history", [])]
        # Applied at the first step, not here: setting up the run after this (the loader's
        # iterator among others) may draw from the global generators.
        states = checkpoint.get("rng_states")  # one entry per process
        if not isinstance(states, list):
            states = None
        rank, size = rank_and_size()
        if states and len(states) != size:  # resumed on another number of processes
            log.warning("random states of %d processes in the checkpoint, %d now: not restored (the generators "
                        "keep the run's seed)", len(states), size)
            states = None
        self._rng_to_restore = states[rank] if states else None

    def on_fit_end(self) -> None:
        root = self.trainer.default_root_dir
        sharded = is_sharded(self.model)
        # under FSDP2 every process takes part in gathering the full weights
        state = full_state_dict(self.model) if self.export_weights and sharded else None
        if not self.trainer.is_global_zero:
            return
        if self.export_weights:
            target = storage.join(root, WEIGHTS_NAME)
            if self.adapters:
                state = state if sharded else self.model.state_dict()
                path = save_state_dict(merged_state_dict(state, self.adapters), target)
                # and the adapters alone, for `kangaroo export --keep-adapters`
                write_adapters(root, self.adapters, {k: v for k, v in state.items() if ADAPTER_MARK in k})
            else:
                path = save_state_dict(state, target) if sharded else save_weights(self.model, target)
            rank_zero_info(f"stage weights written to {path}")
        metrics = {k: _finite_or_none(float(v)) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        summary = {"steps": self.global_step,
                   "final_loss": self.loss_history[-1][1] if self.loss_history else None,
                   "eval_accuracy": metrics.get("val/accuracy"), "eval": metrics,
                   "loss_history": self.loss_history}
        storage.write_text(storage.join(root, METRICS_NAME), json.dumps(summary, indent=1))


def check_positions(longest: int, what: str, limit: tuple[int, str]) -> None:
    """Refuses samples of ``longest`` positions past ``limit`` (``position_limit`` of the LLM's
    config): positions past ``max_position_embeddings`` are an extrapolation of its RoPE that it
    was never trained for, which transformers computes without a word."""
    most, rope = limit
    if longest > most:
        raise ValueError(
            f"{what} {longest} positions, past the language model's limit of {most} "
            f"(max_position_embeddings; {rope}). State how the model reaches them in the stage config, "
            "under model.architecture.language_model_overrides (e.g. Llama-3.1-style RoPE scaling in "
            "rope_parameters with a larger max_position_embeddings, as configs/kangaroo-8b/5-long-video-tuning.yaml "
            "does), or give the stage a smaller sample budget")


def rng_states() -> dict[str, Any]:
    """This process's random states in types that a weights-only ``torch.load`` reads (numpy's
    state array as a list: Lightning resumes with ``weights_only`` loading)."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _finite_or_none(value: float) -> float | None:
    """JSON has no nan: a metric without data (no questions held out) is written as null."""
    return None if value != value else value
