#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Barrier rendezvous over the store (placeholder: being written, see issue 3)."""

__version__ = "0.1.0"
__all__ = []

import logging

try:  # vendored inside a package
    from . import store as _store
except ImportError:  # top-level module
    import store as _store

log = logging.getLogger(__name__)
