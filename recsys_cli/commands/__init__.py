"""Sub-commands of the `recsys` CLI, in the order `recsys --help` lists them.

Named, not imported: recsys_cli.main imports only the module of the command it runs (`recsys
serve` imports no training/ module and no torch), and a command that runs others (demo) can
import recsys_cli.main without an import cycle.
"""

COMMANDS = {
    "demo": "train, export and serve the whole pipeline on synthetic data",
    "train": "train a model stage (retrieval, prerank, rerank)",
    "evaluate": "evaluate a baseline, or a published version through its served path",
    "diagnose": "last-item, history-shuffle and maxlen diagnostics of a retriever",
    "export": "publish checkpoints as an artifact version (ONNX, index, catalog)",
    "retrain": "retrain every stage on the base data plus the event log and publish through the gate",
    "reindex": "re-index the current catalog into a new artifact version and flip CURRENT",
    "rollback": "point CURRENT at an older artifact version",
    "serve": "serve /v1/recommend over the published artifacts",
    "data": "data-set tools: write any --data source out as CSV / Parquet tables",
    "config": "print every RECSYS_* setting: its default, current value and source",
}  # name -> the one-line help `recsys --help` shows without importing the command
