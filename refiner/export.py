"""Deprecated: ``python -m refiner.export ...`` is ``refiner export ...`` (:mod:`refiner.apps.export`)."""

if __name__ == "__main__":
    import sys

    from refiner.apps.export import main

    print("deprecated: `python -m refiner.export` is now `refiner export` (or `python -m refiner export`)",
          file=sys.stderr)
    raise SystemExit(main())
