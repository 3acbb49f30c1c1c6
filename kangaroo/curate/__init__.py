"""Video data curation (paper §III-B to §III-D): filters, their detectors, and the pipeline
behind ``kangaroo curate``."""

from kangaroo.curate.detectors import (CascadeFaceDetector, FaceDetector, RapidOCRTextDetector, TextDetector,
                                       union_coverage)
from kangaroo.curate.filters import (CaptionRepetitionFilter, CategoryBalance, CurateFilter, DatasetFilter,
                                     FaceCoverageFilter, Item, SampleFilter, SceneCut, StaticSceneFilter,
                                     TextCoverageFilter, Verdict, caption_repetition, default_filters)
from kangaroo.curate.pipeline import CurateReport, curate, load_filters
from kangaroo.curate.captions import Captioning  # noqa: E402 - after the pipeline it builds on

__all__ = [
    "CaptionRepetitionFilter", "Captioning", "CascadeFaceDetector", "CategoryBalance", "CurateFilter", "CurateReport",
    "DatasetFilter", "FaceCoverageFilter", "FaceDetector", "Item", "RapidOCRTextDetector", "SampleFilter",
    "SceneCut", "StaticSceneFilter", "TextCoverageFilter", "TextDetector", "Verdict", "caption_repetition",
    "curate", "default_filters", "load_filters", "union_coverage",
]
