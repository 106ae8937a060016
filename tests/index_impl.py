"""The index implementation tests build, `KVROUTE_INDEX_IMPL` (auto, native or python), and the
event receive loop their subscribers run, `KVROUTE_RECEIVE_IMPL`: CI runs the index and event
tests once per implementation (`make test`, `make test-index-python`)."""

from __future__ import annotations

import os
from typing import Any, cast

from kvroute.events.native_receive import ReceiveImpl
from kvroute.index import PrefixIndex, create_index
from kvroute.index.impl import IndexImpl

IMPL = cast(IndexImpl, os.environ.get("KVROUTE_INDEX_IMPL", "auto"))
RECEIVE_IMPL = cast(ReceiveImpl, os.environ.get("KVROUTE_RECEIVE_IMPL", "auto"))


def new_index(*args: Any, **kwargs: Any) -> PrefixIndex:
    """A fresh index of the implementation under test (same arguments as `PrefixIndex`)."""
    return create_index(*args, impl=IMPL, **kwargs)
