"""Sub-commands of the `recsys` CLI, in the order `recsys --help` lists them."""

from training.commands import demo, diagnose, evaluate, export, reindex, rollback, serve, train

COMMANDS = [demo, train, evaluate, diagnose, export, reindex, rollback, serve]
