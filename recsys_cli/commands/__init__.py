"""Sub-commands of the `recsys` CLI, in the order `recsys --help` lists them.

Named, not imported: recsys_cli.main imports only the module of the command it runs (`recsys
serve` imports no training/ module and no torch), and a command that runs others (demo) can
import recsys_cli.main without an import cycle.
"""

COMMANDS = ("demo", "train", "evaluate", "diagnose", "export", "reindex", "rollback", "serve", "data")
