#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""The elastic agent and the elasticrun launcher (placeholder: being written, see issue 4)."""

__version__ = "0.1.0"
__all__ = ["main"]

import logging
import sys

try:  # vendored inside a package
    from . import rendezvous as _rdzv
    from . import store as _store
except ImportError:  # top-level modules
    import rendezvous as _rdzv
    import store as _store

log = logging.getLogger(__name__)


def main(argv=None):
    sys.stderr.write("elasticrun: not implemented yet\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
