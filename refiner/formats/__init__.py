"""Formats of what enters and leaves refiner: the first-stage fingerprint (:mod:`.fingerprint`), diffusers
folders (:mod:`.diffusers`) and model cards (:mod:`.model_card`)."""
