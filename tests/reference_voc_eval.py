"""Independent reference for VOC AP: a plain numpy port of py-faster-rcnn's ``voc_eval.py``.

Works on VOC boxes (1-based inclusive pixel indices) with the devkit's ``+1`` rule. Two
documented departures, matching the rules refvision decided:

* detections are sorted with a stable sort on ``-confidence`` (the original uses numpy's
  default quicksort), and with ``group_ties=True`` the precision/recall curve keeps one
  point per distinct score (the last detection of each run of equal scores);
* a class without non-difficult ground truth gets AP NaN instead of a division by zero.
"""

import numpy as np


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """The devkit's AP from recall and precision arrays (11-point or all-points)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def voc_eval(
    detections: list[tuple[int, float, list[float]]],
    annotations: dict[int, list[dict]],
    classname: int,
    ovthresh: float = 0.5,
    use_07_metric: bool = True,
    group_ties: bool = True,
) -> float:
    """AP of one class.

    Args:
        detections: ``(image_id, confidence, [xmin, ymin, xmax, ymax])`` of this class, in
            file order (within one image, the order of that image's detections).
        annotations: image id -> objects ``{"name", "bbox", "difficult"}`` of all classes.
        classname: the class evaluated (objects compare their ``name`` to it).
    """
    curve = voc_curve(detections, annotations, classname, ovthresh, group_ties)
    if curve is None:
        return float("nan")
    if len(curve[0]) == 0:
        return 0.0
    return voc_ap(*curve, use_07_metric)


def voc_curve(
    detections: list[tuple[int, float, list[float]]],
    annotations: dict[int, list[dict]],
    classname: int,
    ovthresh: float = 0.5,
    group_ties: bool = True,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rec, prec)`` of one class as the devkit computes them (empty without detections), None without positives."""
    class_recs = {}
    npos = 0
    for imagename, objects in annotations.items():
        R = [obj for obj in objects if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R], dtype=np.float64).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    if npos == 0:
        return None
    if len(detections) == 0:
        return np.zeros(0), np.zeros(0)

    image_ids = [x[0] for x in detections]
    confidence = np.array([x[1] for x in detections], dtype=np.float64)
    BB = np.array([x[2] for x in detections], dtype=np.float64)

    sorted_ind = np.argsort(-confidence, kind="stable")
    sorted_scores = confidence[sorted_ind]
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)

        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                - inters
            )
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)

        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if group_ties:
        last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
        rec, prec = rec[last], prec[last]
    return rec, prec
