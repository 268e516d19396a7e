"""``python -m refiner <command> ...``: the ``refiner`` command (:mod:`refiner.apps.commands`)."""

from refiner.apps.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
