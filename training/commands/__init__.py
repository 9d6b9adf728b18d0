"""Sub-commands of the `recsys` CLI, in the order `recsys --help` lists them."""

from training.commands import demo, diagnose, evaluate, train

COMMANDS = [demo, train, evaluate, diagnose]
