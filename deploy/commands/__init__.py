"""`twin` subcommands, one module per stage."""
