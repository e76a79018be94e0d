"""The command-line layer: the only part of twotower that imports typer/rich, prints or exits."""
