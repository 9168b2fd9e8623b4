"""Adapters that run the reference methods inside other libraries' models (timm, ...).

Each adapter patches a model reversibly: ``reference.attach`` dispatches to it and
returns a handle whose ``detach`` restores the model exactly.
"""
