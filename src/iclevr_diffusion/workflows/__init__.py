"""Workflows: what each subcommand does, as plain functions that own the console, tables and files.

They sit between the CLI (option parsing) and the core library (no rich, no typer).
"""
