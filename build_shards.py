"""Build training/validation shards from image folders: `python build_shards.py [overrides]`
(the same as `refiner build-shards ...`; body in refiner/apps/build_shards.py).

Exit codes (refiner.cli): 0 every image was sharded; 1 some images could not be read (listed in each split's
manifest.json and on stderr) or a split had no readable image; 2 a setting, first-stage checkpoint or folder
that cannot work (one `error:` line on stderr, before any split is written).
"""

from refiner.apps.build_shards import main

if __name__ == "__main__":
    main()
