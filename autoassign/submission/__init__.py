"""The benchmarks' submission files, written from a detector's predictions.

One module per format, each with one writer taking a
:data:`~autoassign.eval.base.PredictionStore` (image name -> its detections: ``boxes``
``[K, 4]`` xyxy in continuous original-image pixels, ``scores`` ``[K]``, ``labels`` ``[K]``
contiguous class indices):

* :mod:`~autoassign.submission.coco_results` (``coco-results``): the COCO results JSON that
  the COCO and Objects365 servers take, with the annotation file's own image and category ids.
* :mod:`~autoassign.submission.widerface` (``widerface``): the official layout, a folder per
  event and one ``.txt`` per image, which the official evaluation tool reads.
* :mod:`~autoassign.submission.voc` (``voc``): the PASCAL VOC devkit's
  ``comp4_det_<split>_<class>.txt`` files.

``python -m autoassign.predict ... --format F`` writes them; the project's own
``predictions.json`` (:mod:`autoassign.eval.predictions`) stays its default.
"""

from __future__ import annotations

from autoassign.errors import AutoAssignError

FORMATS = ("autoassign", "coco-results", "widerface", "voc")
"""``--format`` values of ``python -m autoassign.predict``; ``autoassign`` is the project's
``predictions.json``."""


class SubmissionError(AutoAssignError):
    """The images, the model's classes or the ids a submission format needs do not fit (an
    image the annotation file does not list, an image outside an event folder, ...); the
    message names the image and the file. Exit status 2, like a bad command line."""

    exit_code = 2
