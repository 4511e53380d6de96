"""The ``mmchat`` subcommands, one module each."""
