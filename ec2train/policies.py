"""IAM policy templates and their renderer.

The templates live once, as package data in `ec2train/_policies/*.json`, so they ship in the
wheel; `infra/policies/*.json` are symlinks to them for people reading the repository.
A template uses `${Var}` placeholders; `render_policy` fills them, after checking each value
against the rules of the thing it names, and refuses to leave any placeholder unfilled.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z][A-Za-z0-9]*)\}")

# The rules of the names a template may carry; ec2train.deploy checks its options against them too.
PARTITION_RE = re.compile(r"^aws(-[a-z]+)*$")
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
ACCOUNT_ID_RE = re.compile(r"^[0-9]{12}$")
# SageMaker's own rule for endpoint names.
ENDPOINT_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
# Lambda's rule for a plain function name (no ARN, no alias).
FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Every placeholder a template may use, with the rule its value must follow.
_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "Partition": (PARTITION_RE, "an AWS partition such as aws, aws-cn or aws-us-gov"),
    "Region": (REGION_RE, "an AWS region such as us-east-1"),
    "AccountId": (ACCOUNT_ID_RE, "a 12-digit AWS account id"),
    "EndpointName": (ENDPOINT_NAME_RE, "a SageMaker endpoint name"),
    "FunctionName": (FUNCTION_NAME_RE, "a Lambda function name"),
    # S3's bucket naming rule; a key prefix of plain characters only, no leading, trailing or
    # doubled '/': a wildcard (* ?) or a quote could widen the policy or break it.
    "Bucket": (re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"), "an S3 bucket name"),
    "Prefix": (
        re.compile(r"^(?!.*//)[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*$"),
        "an S3 key prefix of letters, digits, . _ - = and / (no * ?, no empty segment)",
    ),
}


class PolicyTemplateError(ValueError):
    """A template that does not exist, or a variable that is missing or malformed."""


def _template_dir():
    return resources.files("ec2train") / "_policies"


def template_names() -> list[str]:
    """Names accepted by `render_policy`, e.g. "lambda-invoke-endpoint"."""
    return sorted(p.name[: -len(".json")] for p in _template_dir().iterdir() if p.name.endswith(".json"))


def template_text(name: str) -> str:
    name = name[: -len(".json")] if name.endswith(".json") else name
    if name not in template_names():
        raise PolicyTemplateError(f"no policy template named {name!r}; known: {', '.join(template_names())}")
    return (_template_dir() / f"{name}.json").read_text(encoding="utf-8")


def placeholders(name: str) -> set[str]:
    """The variables a template needs."""
    return set(_PLACEHOLDER.findall(template_text(name)))


def _check(var: str, value: Any) -> str:
    if var not in _RULES:
        raise PolicyTemplateError(f"template uses unknown placeholder ${{{var}}}")
    pattern, what = _RULES[var]
    if not isinstance(value, str) or not pattern.match(value):
        raise PolicyTemplateError(f"{var} must be {what}, got {value!r}")
    # IAM matches SageMaker ARNs in lowercase, whatever case the endpoint was created with.
    return value.lower() if var == "EndpointName" else value


def render_policy(name: str, **variables: Any) -> dict:
    """The policy document `name` with its `${Var}` placeholders filled in.

    Variables a template does not use are ignored, so one set of values fits every template.
    """
    needed = placeholders(name)
    missing = sorted(needed - variables.keys())
    if missing:
        raise PolicyTemplateError(f"policy {name!r} needs {', '.join(missing)}")
    values = {var: _check(var, variables[var]) for var in needed}

    # Substitute inside the parsed document, string by string: values can never change its shape.
    def fill(node: Any) -> Any:
        if isinstance(node, str):
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], node)
        if isinstance(node, list):
            return [fill(n) for n in node]
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        return node

    return fill(json.loads(template_text(name)))
