"""The compiled index core (src/kvroute/index/_native.c) and receive loop (src/kvroute/events/
_recv.c), built with the system C compiler.

Metadata lives in pyproject.toml; this file only adds the extension (docs/design.md §12). A
machine without a working compiler still installs kvroute: the build prints why the core is
missing and the index runs on its pure-Python reference (`KVROUTE_INDEX_IMPL=python`).
`KVROUTE_REQUIRE_NATIVE=1` (set by `make` and CI) turns that fallback into a failed build, so
broken C never passes unnoticed.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wno-unused-parameter"]
NATIVE = Extension(
    "kvroute.index._native", sources=["src/kvroute/index/_native.c"], extra_compile_args=_CFLAGS
)
# The subscriber's receive loop (events/native_receive.py); it calls the libzmq pyzmq loaded,
# looked up at run time, so it needs no libzmq headers or library to build.
RECEIVE = Extension(
    "kvroute.events._recv", sources=["src/kvroute/events/_recv.c"], extra_compile_args=_CFLAGS
)


class OptionalBuildExt(build_ext):
    """build_ext that reports a failed native build loudly instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any compiler failure means: no native core
            self._report(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: BaseException) -> None:
        if os.environ.get("KVROUTE_REQUIRE_NATIVE") == "1":
            raise exc
        banner = "=" * 72
        print(
            f"\n{banner}\nkvroute: the native index core did not build: {exc}\n"
            "kvroute will run on its pure-Python index (slower, more memory).\n"
            "Install a C compiler and Python headers, then reinstall, to get it.\n"
            f"{banner}\n",
            file=sys.stderr,
        )


setup(ext_modules=[NATIVE, RECEIVE], cmdclass={"build_ext": OptionalBuildExt})
