"""Formats of what enters and leaves refiner: so far the first-stage fingerprint (:mod:`.fingerprint`)."""
