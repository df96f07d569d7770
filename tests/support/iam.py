"""IAM documents checked by parliament (with its community auditors), as AWS's own linter would."""

from __future__ import annotations

import importlib.resources
import json
import sys
import types


def _parliament():
    """parliament 1.6.4 imports pkg_resources at import time only, for `resource_filename`;
    setuptools >= 82 removed that module (duo-labs/parliament#247), and pinning an older
    setuptools would pin a release with a published advisory. Lend it a stand-in for the
    import, then take the stand-in away so nothing else in the session sees it."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(importlib.resources.files(package) / name)
        sys.modules["pkg_resources"] = shim
        try:
            import parliament
        finally:
            sys.modules.pop("pkg_resources", None)
        return parliament
    import parliament

    return parliament


def lint(document: dict) -> list:
    parliament = _parliament()
    policy = parliament.analyze_policy_string(json.dumps(document), include_community_auditors=True)
    return list(policy.findings)
