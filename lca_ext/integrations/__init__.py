"""Adapters from lca_ext to training frameworks.

Each submodule imports its framework only when it is itself imported, so
``import lca_ext`` never needs them:

    lca_ext.integrations.lightning    LCACallback for PyTorch Lightning
"""
