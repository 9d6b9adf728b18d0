"""Sub-commands of the `recsys` CLI, in the order `recsys --help` lists them."""

from training.commands import demo, evaluate

COMMANDS = [demo, evaluate]
