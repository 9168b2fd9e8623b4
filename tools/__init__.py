"""Tooling for the Awesome Token Compress catalog: schema, loader, renderers and CLI.

Run ``python -m tools --help`` for the commands.
"""
