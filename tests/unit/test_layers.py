"""The router and the operator run without the pod server's libraries, and a missing extra is one line.

Each check runs in a fresh interpreter, so imports made by other tests cannot mask a leak."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "transformers", "tokenizers", "safetensors", "gpufleet.pod_server")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("package", ["gpufleet.router", "gpufleet.operator"])
def test_control_plane_imports_no_torch_transformers_or_pod_server(package: str) -> None:
    proc = _python(
        f"""
        import importlib, pkgutil, sys
        import {package} as pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
        if pkg.__name__ == "gpufleet.router":
            from gpufleet.router.app import create_app
            from gpufleet.router.settings import load_router_settings
            create_app(load_router_settings(pod_urls=["http://127.0.0.1:9"]))
        heavy = {HEAVY!r}
        def loaded():
            return sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + "." for h in heavy)))
        before = loaded()
        from gpufleet.cli import build_parser
        build_parser()  # every command registered (their cli modules are stdlib only), none run
        after = [m for m in loaded() if m not in ("gpufleet.pod_server", "gpufleet.pod_server.cli")]
        print(before, after)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[] []", f"{package} (then the command line) loaded: {proc.stdout.strip()}"


def test_a_missing_extra_is_one_line_naming_it() -> None:
    # aiohttp made unimportable, as in an install without the router extra.
    proc = _python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "aiohttp":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from gpufleet.cli import main
        sys.exit(main(["router", "--pod-urls", "http://127.0.0.1:9"]))
        """
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == "gpufleet router: aiohttp is not installed; pip install 'gpufleet[router]' brings it\n"
