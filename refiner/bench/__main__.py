"""``python -m refiner.bench [overrides]``: the composition benchmark (see :mod:`refiner.bench.run`)."""

from refiner.apps.bench import main

if __name__ == "__main__":
    main()
