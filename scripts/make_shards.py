"""Convert an HF dataset or an image folder into webdataset shards: `transferline data shards` as a script.

    python scripts/make_shards.py SOURCE --out DIR [--split train] [--max-count 10000] [--max-size 1G] ...

SOURCE is a `save_to_disk` directory, an image folder (DIR/<class>/*.jpg or DIR/<split>/<class>/*.jpg)
or a Hub name (when online). Re-run the same command after an interruption: it continues.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "shards", *sys.argv[1:]]))
