"""Detectors behind the text and face coverage filters, each one small class.

A detector takes one RGB frame (``(H, W, 3)`` uint8) and returns the regions it found as
polygons in pixel coordinates (a list of ``(x, y)`` corners; a box is four corners). The filters
only need that, so any detector can take a default's place: subclass ``TextDetector`` or
``FaceDetector``, implement ``__call__`` and name the class in the curation YAML.

Both defaults run offline from what their registry packages ship, with no download:

- ``RapidOCRTextDetector``: the PP-OCRv4 text detection network (the PaddleOCR model family
  the paper used), as the ONNX export bundled with ``rapidocr-onnxruntime``.
- ``CascadeFaceDetector``: the frontal-face LBP cascade bundled with scikit-image. It is a
  classic detector, weaker than a neural one on profiles and small faces, and needs no weights
  beyond the package; a YOLO or RetinaFace detector plugs in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

Polygon = list[tuple[float, float]]


class TextDetector(ABC):
    @abstractmethod
    def __call__(self, frame: np.ndarray) -> list[Polygon]:
        """Text regions of an RGB frame."""


class FaceDetector(ABC):
    @abstractmethod
    def __call__(self, frame: np.ndarray) -> list[Polygon]:
        """Face regions of an RGB frame."""


def box(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


class RapidOCRTextDetector(TextDetector):
    """PP-OCRv4 text detection (DBNet) through ``rapidocr-onnxruntime``; recognition is off.

    Args:
        max_side: frames are scaled so that their longer side is at most this many pixels
            before detection (the detector's own default upscales small frames instead).
        box_threshold: the detector's minimum mean score of a text box.
        threads: ONNX Runtime threads per process (0: its default, all cores). The pool sets 1
            per worker.
    """

    def __init__(self, max_side: int = 960, box_threshold: float = 0.5, threads: int = 0) -> None:
        self.max_side, self.box_threshold, self.threads = max_side, box_threshold, threads
        self._engine = None

    def __getstate__(self) -> dict:  # an ONNX session does not cross processes; each builds its own
        return {**self.__dict__, "_engine": None}

    def __call__(self, frame: np.ndarray) -> list[Polygon]:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            threads = self.threads or -1
            self._engine = RapidOCR(det_limit_type="max", det_limit_side_len=self.max_side,
                                    det_box_thresh=self.box_threshold, print_verbose=False,
                                    intra_op_num_threads=threads, inter_op_num_threads=threads)
        boxes, _ = self._engine(np.ascontiguousarray(frame), use_det=True, use_cls=False, use_rec=False)
        return [[(float(x), float(y)) for x, y in corners] for corners in (boxes or [])]


class CascadeFaceDetector(FaceDetector):
    """Frontal faces by scikit-image's multi-scale LBP cascade (the OpenCV-trained
    ``lbpcascade_frontalface`` file that scikit-image ships).

    Args:
        work_size: frames are scaled so that their shorter side is this many pixels first
            (detection time grows with the pixel count).
        min_face: the smallest face side searched, as a fraction of the scaled frame's shorter side.
        min_neighbours: overlapping detections a face needs (higher: fewer false faces).
    """

    def __init__(self, work_size: int = 144, min_face: float = 0.08, min_neighbours: int = 8) -> None:
        self.work_size, self.min_face, self.min_neighbours = work_size, min_face, min_neighbours
        self._cascade = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cascade": None}

    def __call__(self, frame: np.ndarray) -> list[Polygon]:
        from PIL import Image

        if self._cascade is None:
            from skimage.data import lbp_frontal_face_cascade_filename
            from skimage.feature import Cascade

            self._cascade = Cascade(lbp_frontal_face_cascade_filename())
        height, width = frame.shape[:2]
        scale = self.work_size / min(height, width)
        size = (max(round(width * scale), 1), max(round(height * scale), 1))
        gray = np.asarray(Image.fromarray(frame).convert("L").resize(size, Image.BILINEAR))
        smallest = max(int(self.min_face * min(size)), 24)
        found = self._cascade.detect_multi_scale(
            img=gray, scale_factor=1.2, step_ratio=1, min_size=(smallest, smallest),
            max_size=(min(size), min(size)), min_neighbor_number=self.min_neighbours)
        return [box(f["c"] / scale, f["r"] / scale, (f["c"] + f["width"]) / scale, (f["r"] + f["height"]) / scale)
                for f in found]


def union_coverage(polygons: list[Polygon], height: int, width: int) -> float:
    """The union area of ``polygons`` as a fraction of the frame (paper eq. 1): overlapping
    regions count once, because the polygons are drawn onto one mask."""
    if not polygons:
        return 0.0
    from PIL import Image, ImageDraw

    mask = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in polygons:
        draw.polygon([(float(x), float(y)) for x, y in polygon], fill=1)
    return float(np.asarray(mask).mean())
