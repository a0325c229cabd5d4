"""Talking to ferryd from outside it: the control-API client and the migration progress view.

Both the CLI and the lab drive ferryd, so this sits below both of them.
"""
