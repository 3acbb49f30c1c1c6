"""``kangaroo fit``: LightningCLI over one stage module and one stage data module."""

from __future__ import annotations

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.cli import LightningCLI

from kangaroo import storage
from kangaroo.training.checkpoints import AtomicCheckpointIO, PreemptionCheckpoint, latest_checkpoint
from kangaroo.data.datamodule import KangarooDataModule
from kangaroo.training.stage import KangarooStage
from kangaroo.training.watchdog import StallWatchdog

AUTO_RESUME = "auto"
"""``--ckpt_path=auto``: resume from the newest whole checkpoint under the stage's
``trainer.default_root_dir``, or start afresh when there is none."""


class KangarooCLI(LightningCLI):
    """LightningCLI bound to ``KangarooStage`` and ``KangarooDataModule`` (no subclass mode: the
    YAML holds their arguments directly under ``model:`` and ``data:``).

    Checkpoints go to ``<default_root_dir>/checkpoints`` unless a ``ModelCheckpoint`` names its
    ``dirpath``. Every fit writes checkpoints atomically (``AtomicCheckpointIO``, unless the config names
    another checkpoint IO plugin), saves one on SIGTERM (``PreemptionCheckpoint``), ends a run whose process made no progress
    for 5 minutes with exit code 76 (``StallWatchdog``; each unless the config lists its own
    under ``trainer.callbacks``), and takes
    ``--ckpt_path=auto``. A stage file whose architecture names a ``base:`` file is read whole
    (``kangaroo.training.stage_file.fit_arguments``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs) -> None:
        import sys
        import warnings

        from kangaroo.training.stage_file import fit_arguments

        if args is None:  # the command line itself, rewritten: LightningCLI's warning about both is moot
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run")
        args = fit_arguments(sys.argv[1:] if args is None else list(args))
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"callbacks": [PreemptionCheckpoint(), StallWatchdog()]})
        super().__init__(KangarooStage, KangarooDataModule, args=args, run=run, **kwargs)

    def instantiate_trainer(self, **kwargs):
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        # the config's own (e.g. another ``grace_s`` or ``timeout_s``) replaces the default one
        listed = {type(callback) for callback in callbacks}
        self.trainer_defaults["callbacks"] = [c for c in self.trainer_defaults.get("callbacks", [])
                                              if type(c) not in listed]
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        for callback in self.trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                # beside the stage's weights, not inside the logger's folder: the two may live
                # apart (an s3:// root with local logs)
                callback.dirpath = storage.join(self.trainer.default_root_dir, "checkpoints")
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == AUTO_RESUME:
            found = latest_checkpoint(self.trainer.default_root_dir)
            config["ckpt_path"] = found
            print(f"resuming from {found}" if found else "no checkpoint to resume from: starting afresh", flush=True)

