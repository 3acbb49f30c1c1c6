"""The training runtime of one curriculum stage: the stage LightningModule (``stage``), optimizer
groups and the schedule (``optim``), freezing (``freezing``), weight files in and out
(``weights``), FSDP2 sharding (``fsdp``), atomic and preemption checkpoints (``checkpoints``),
callbacks a config can add (``callbacks``), the LightningCLI of ``kangaroo fit`` (``fit``) and
stage files read outside a fit (``stage_file``). It builds on ``kangaroo.modules`` and
``kangaroo.data``; nothing below imports it."""
