"""The packages' lazy attributes (cfvit_deploy.lazy): imported on first access, unknown names refused."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_lazy_attribute_imports_its_submodule_only_on_access():
    code = (
        "import sys, runtimes\n"
        "assert 'runtimes.pipeline' not in sys.modules\n"
        "from runtimes import CFViTPipeline\n"
        "assert CFViTPipeline.__module__ == 'runtimes.pipeline' and 'runtimes.pipeline' in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("package", ["cfvit_deploy", "exporters", "runtimes"])
def test_unknown_attribute_is_an_attribute_error_naming_the_package(package):
    module = __import__(package)
    with pytest.raises(AttributeError, match=rf"^module '{package}' has no attribute 'no_such_name'$"):
        module.no_such_name  # noqa: B018
    assert not hasattr(module, "no_such_name")
