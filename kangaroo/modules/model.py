"""KangarooModel: vision tower -> temporal embedding -> patchify -> projector -> language model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kangaroo.modules.layout import VisualLayout, VisualTokens, normalize_pixels
from kangaroo.modules.loss import first_answer_tokens, labelled_sample_logprobs, labelled_token_loss
from kangaroo.modules.patchify import SpatialTemporalPatchify
from kangaroo.modules.temporal_embedding import TemporalPositionEmbedding
from kangaroo.modules.vision_tower import VisionTower

PART_NAMES = ("vision_tower", "temporal_embedding", "patchify", "projector", "language_model")
SINGLE_ROW_PACKING = ("flash_attention_2",)
"""Attention implementations that treat a batch as packed samples only when it holds one row."""


@dataclass
class KangarooOutput:
    loss: torch.Tensor | None
    """Mean cross-entropy over labelled tokens (``None`` without labels)."""
    loss_sum: torch.Tensor | None
    """Summed cross-entropy, for weighting across ranks or micro-batches."""
    num_label_tokens: torch.Tensor | None
    logits: torch.Tensor | None = None
    """``(b, s, vocab)``, only when asked for: never materialised during training."""
    answers: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(predicted, target)`` first answer token of every labelled sample, when asked for
    (``first_answers=True``; see ``kangaroo.modules.loss.first_answer_tokens``)."""
    sample_logprobs: torch.Tensor | None = None
    """Each labelled sample's summed log-probability of its labels, when asked for
    (``sample_logprobs=True``; see ``kangaroo.modules.loss.labelled_sample_logprobs``)."""
    sample_label_counts: torch.Tensor | None = None
    """How many labelled tokens each of those samples has."""


class KangarooModel(nn.Module):
    """Composes the five parts, each injected and usable alone.

    Inputs of ``forward`` (``M`` media items, ``N`` frames in all, in the order their
    placeholders appear in ``input_ids``, row by row):

    - ``input_ids``, ``labels``, ``position_ids``: ``(b, s)``; packed rows restart
      ``position_ids`` at 0 for every sample, and no token then attends across samples.
    - ``pixel_values``: ``(N, 3, H, W)`` uint8 frames (normalised on arrival, on the model's
      device, into the vision tower's dtype) or frames already CLIP-normalised; ``timestamps``: ``(N,)`` seconds;
      ``frame_counts``: ``(M,)`` frames per media item (an image is one frame).
    """

    def __init__(
        self,
        vision_tower: VisionTower,
        temporal_embedding: TemporalPositionEmbedding,
        patchify: SpatialTemporalPatchify | None,
        projector: nn.Module,
        language_model: nn.Module,
        visual_tokens: VisualTokens,
        loss_chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.temporal_embedding = temporal_embedding
        self.patchify = patchify
        self.projector = projector
        self.language_model = language_model
        self.visual_tokens = visual_tokens
        self.loss_chunk_size = loss_chunk_size
        self._flatten_rows: bool | None = None
        self.always_run_vision = False
        """Run the vision tower on a blank frame when the inputs hold no media, its output
        multiplied by zero: set under data parallelism, where a rank whose batch is text only
        must still take part in the tower's collectives (gradient reduction, FSDP gathers)."""
        vocab = language_model.get_input_embeddings().num_embeddings
        if max(vars(visual_tokens).values()) >= vocab:
            raise ValueError(f"visual token ids {visual_tokens} do not fit the language model's vocabulary of {vocab}")

    def parts(self) -> dict[str, nn.Module | None]:
        return {name: getattr(self, name) for name in PART_NAMES}

    # -- visual token arithmetic -------------------------------------------------------------

    @property
    def layout(self) -> VisualLayout:
        """The visual token layout of this model (all data code needs of it)."""
        kernel = self.patchify.kernel if self.patchify is not None else None
        return VisualLayout(self.vision_tower.image_size, self.vision_tower.grid, kernel, self.visual_tokens)

    def visual_grid(self, frames: int) -> tuple[int, int, int]:
        """``(slots, h, w)`` of the token grid the LLM sees for ``frames`` frames."""
        return self.layout.visual_grid(frames)

    def num_visual_tokens(self, frames: int) -> int:
        return self.layout.num_visual_tokens(frames)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per video frame at this resolution (128 at 448 with patchify)."""
        return self.layout.tokens_per_frame

    def placeholder_ids(self, frames: int) -> list[int]:
        """The visual layout of one media item of ``frames`` frames, as token ids."""
        return self.layout.placeholder_ids(frames)

    def visual_dtype(self) -> torch.dtype:
        """The dtype the vision tower's weights are held in: normalised frames are cast to it."""
        return next(self.vision_tower.parameters()).dtype

    # -- forward -----------------------------------------------------------------------------

    def get_visual_features(
        self, pixel_values: torch.Tensor, timestamps: torch.Tensor, frame_counts: torch.Tensor
    ) -> torch.Tensor:
        """Returns ``(V, d_llm)`` projected visual tokens, media after media, slot-major.

        Every part runs once per call, whatever the number of media items: under FSDP2 each part
        is a unit whose parameters are gathered per call, so a per-media loop would make the
        number of collectives depend on a rank's data (one rank gathering patchify again while
        another has moved on to the projector). Patchify takes every media item of the batch in
        one call: its kernel equals its stride, so media laid end to end in time, each a
        multiple of the temporal kernel long (an image repeated to fill it), never share a window.
        """
        counts = [int(c) for c in frame_counts.tolist()]
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"frame_counts sum to {sum(counts)} but pixel_values holds {pixel_values.shape[0]} frames")
        if pixel_values.dtype == torch.uint8:  # frames as the loader sends them: normalised here, on the device
            pixel_values = normalize_pixels(pixel_values, self.visual_dtype())
        features = self.temporal_embedding(self.vision_tower(pixel_values), timestamps)
        h, w = self.vision_tower.grid
        grid = features.reshape(features.shape[0], h, w, -1)
        if self.patchify is not None:
            kt, layout = self.patchify.kernel[0], self.layout
            for count in counts:
                layout.visual_grid(count)  # a frame count the kernel does not divide is an error
            if any(count == 1 for count in counts) and kt > 1:  # images fill the temporal kernel
                grid = torch.cat([media.expand(kt, -1, -1, -1) if len(media) == 1 else media
                                  for media in torch.split(grid, counts)])
            grid = self.patchify(grid)
        return self.projector(grid.reshape(-1, grid.shape[-1]))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings ``(b, s, d)`` with visual features scattered into the placeholders.
        ``visual_features``: features ``get_visual_features`` gave earlier (inference reuses a
        video's features across requests) instead of ``pixel_values``."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        slots = input_ids == self.visual_tokens.placeholder
        num_slots = int(slots.sum())
        if visual_features is None:
            if pixel_values is None:
                if num_slots:
                    raise ValueError(f"input_ids hold {num_slots} visual placeholder tokens but no pixel_values were given")
                if self.always_run_vision:
                    size = self.vision_tower.image_size
                    blank = embeds.new_zeros((1, 3, size, size), dtype=torch.float32)
                    features = self.get_visual_features(blank, blank.new_zeros(1), torch.ones(1, dtype=torch.long))
                    embeds = embeds + features.sum().to(embeds.dtype) * 0.0
                return embeds
            if timestamps is None or frame_counts is None:
                raise ValueError("pixel_values need timestamps and frame_counts")
            visual_features = self.get_visual_features(pixel_values, timestamps, frame_counts)
        if visual_features.shape[0] != num_slots:
            raise ValueError(f"input_ids hold {num_slots} visual placeholder tokens but the media give "
                             f"{visual_features.shape[0]} visual features"
                             + ("" if frame_counts is None else f" (frame_counts={frame_counts.tolist()})"))
        return embeds.masked_scatter(slots.unsqueeze(-1), visual_features.to(embeds.dtype))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``(b, s, d)`` of the language model, before the output head.

        Packed rows (``position_ids`` restarting at 0 inside a row) are told apart by their
        positions alone: transformers derives the per-sample attention from them when no mask is
        given, so a mask beside packed rows is refused rather than silently overriding it. An
        implementation that treats only a single row as packed (``flash_attention_2``, whose
        varlen kernel takes the sample boundaries of one sequence) gets the rows laid end to end
        as one sequence; every row starts at position 0, so the rows stay apart.
        """
        embeds = self.embed_inputs(input_ids, pixel_values, timestamps, frame_counts)
        packed = position_ids is not None and bool((position_ids[:, 1:] == 0).any())
        if packed and attention_mask is not None:
            raise ValueError("an attention_mask was given with packed rows (position_ids restart inside a row): "
                             "packed samples are kept apart by their position_ids alone; pass no attention_mask")
        rows, length = input_ids.shape
        flatten = rows > 1 and position_ids is not None and self.flatten_rows
        if flatten:
            embeds, position_ids = embeds.reshape(1, rows * length, -1), position_ids.reshape(1, -1)
        hidden = self.language_model.base_model(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return hidden.reshape(rows, length, -1) if flatten else hidden

    @property
    def flatten_rows(self) -> bool:
        """Whether several rows go to the language model as one sequence (see ``hidden_states``)."""
        if self._flatten_rows is not None:
            return self._flatten_rows
        return getattr(self.language_model.config, "_attn_implementation", None) in SINGLE_ROW_PACKING

    @flatten_rows.setter
    def flatten_rows(self, value: bool | None) -> None:
        self._flatten_rows = value

    @property
    def output_head(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        frame_counts: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = False,
        first_answers: bool = False,
        sample_logprobs: bool = False,
    ) -> KangarooOutput:
        """Everything the output head computes happens here, inside ``forward``: a sharded
        (FSDP2) model gathers its parameters around this call."""
        hidden = self.hidden_states(input_ids, position_ids, pixel_values, timestamps, frame_counts, attention_mask)
        head = self.output_head
        logits = head(hidden) if return_logits else None
        if labels is None:
            return KangarooOutput(loss=None, loss_sum=None, num_label_tokens=None, logits=logits)
        per_sample = counts = None
        if sample_logprobs:  # the same cross-entropy, summed per sample as well
            per_sample, counts = labelled_sample_logprobs(hidden, labels, head, position_ids, self.loss_chunk_size)
            loss_sum, count = -per_sample.sum(), counts.sum()
        else:
            loss_sum, count = labelled_token_loss(hidden, labels, head, position_ids, self.loss_chunk_size)
        loss = loss_sum / count.clamp(min=1)
        answers = first_answer_tokens(hidden, labels, head, position_ids) if first_answers else None
        return KangarooOutput(loss=loss, loss_sum=loss_sum, num_label_tokens=count, logits=logits, answers=answers,
                              sample_logprobs=per_sample, sample_label_counts=counts)
