"""Write any data set as `seqtxt` (one user per line: `user item item ...` in time order), so a
run can show that nothing relies on side features (no ratings, timestamps, user or item fields).

    python benchmarks/quality/write_seqtxt.py --data movielens:../shared/data/ml-100k --out /tmp/ml100k.txt

The output is derived from the input data set: keep it out of the repository when its licence
forbids redistribution (ml-100k's does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.data.sources import load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ds = load(a.data)
    with open(Path(a.out), "w") as f:
        for u in range(ds.num_users):
            f.write(" ".join([str(ds.user_ids[u]), *(str(ds.item_ids[i]) for i in ds.sequence(u))]) + "\n")
    print(f"{a.out}: {ds.num_users} users, {ds.num_interactions} interactions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
