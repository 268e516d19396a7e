"""Inference: the chain of window experts (:mod:`.chain`), images through it (:mod:`.pipeline`), images of any
size (:mod:`.tiling`, :mod:`.progressive`), and refine.py's output records (:mod:`.outputs`) and metrics
(:mod:`.evaluate`)."""
