"""`recsys data convert`: write any data source as the interactions / items / users tables that the
`csv:` and `parquet:` sources read (training/data/convert.py), e.g. ml-100k for a first look at
the "your own data" path:

    recsys data convert --data movielens:ml-100k --out ~/data/ml-100k-tables --format csv parquet
    recsys demo --data csv:~/data/ml-100k-tables

It prints the data spec that reads the tables back, and checks that they read back to the same
data set (fingerprint) as the source.
"""

from __future__ import annotations

import argparse

from recsys_cli.commands.common import add_data_arg


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("data", help="data set tools: convert a source to CSV / Parquet tables")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    c = verbs.add_parser("convert", help="write a data source as interactions / items / users tables",
                         description="Write a data source as interactions / items / users tables (CSV or "
                                     "Parquet) that csv:<folder> / parquet:<folder> read back.")
    add_data_arg(c, default=None)
    c.add_argument("--out", required=True, metavar="DIR",
                   help="folder for interactions.<ext>, items.<ext>, users.<ext> (created; keep data sets whose "
                        "licence forbids redistribution, like MovieLens, outside any repository)")
    c.add_argument("--format", nargs="+", choices=("csv", "parquet"), default=["csv"],
                   help="one or both table formats (default: csv)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.data.convert import write_tables
    from training.data.sources import load, read

    raw = read(args.data)
    source = raw.build()
    print(source.describe())
    for fmt in dict.fromkeys(args.format):
        files, spec = write_tables(raw, args.out, fmt)
        back = load(spec)
        same = "the same data set" if back.fingerprint == source.fingerprint else \
            f"a different fingerprint ({back.fingerprint}: vocabularies renumbered by first appearance)"
        print(f"wrote {', '.join(str(f) for f in files)}\n  read back with --data {spec}: {same}")
    return 0
