"""Which AWS PyTorch inference container serves a model, in each region and on each instance type."""

from __future__ import annotations

from ec2train.deploy.names import DeployError

# Account that hosts the AWS Deep Learning Containers in each region (the same table the
# SageMaker Python SDK ships). Regions not listed: pass --image-uri.
DLC_ACCOUNTS: dict[str, str] = {
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-northeast-1": "763104351884",
    "ap-northeast-2": "763104351884",
    "ap-northeast-3": "364406365360",
    "ap-south-1": "763104351884",
    "ap-south-2": "772153158452",
    "ap-southeast-1": "763104351884",
    "ap-southeast-2": "763104351884",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-7": "590183813437",
    "ca-central-1": "763104351884",
    "ca-west-1": "204538143572",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
    "eu-central-1": "763104351884",
    "eu-central-2": "380420809688",
    "eu-north-1": "763104351884",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-west-1": "763104351884",
    "eu-west-2": "763104351884",
    "eu-west-3": "763104351884",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "sa-east-1": "763104351884",
    "us-east-1": "763104351884",
    "us-east-2": "763104351884",
    "us-gov-east-1": "446045086412",
    "us-gov-west-1": "442386744353",
    "us-west-1": "763104351884",
    "us-west-2": "763104351884",
}
PYTORCH_INFERENCE_REPO = "pytorch-inference"
PYTORCH_INFERENCE_VERSION = "2.6.0"
PYTORCH_INFERENCE_PY = "py312"


def _family(instance_type: str) -> str:
    """ "g4dn" for "ml.g4dn.xlarge"; "" for anything not shaped like an instance type."""
    return instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""


def is_gpu_instance(instance_type: str) -> bool:
    return _family(instance_type).startswith(("g", "p"))


def image_uri_for(region: str, instance_type: str | None, serverless: bool = False) -> str:
    """The AWS PyTorch inference container for this region: GPU tag on ml.g*/ml.p*, else CPU."""
    if instance_type and not serverless and _family(instance_type).startswith(("inf", "trn")):
        raise DeployError(
            f"{instance_type} needs a Neuron-compiled model and the pytorch-inference-neuronx image; "
            "pass --image-uri, or pick an ml.g* (GPU) or ml.c*/ml.m* (CPU) instance type"
        )
    account = DLC_ACCOUNTS.get(region)
    if account is None:
        raise DeployError(
            f"no PyTorch inference image is known for region {region}; pass --image-uri "
            f"<account>.dkr.ecr.{region}.amazonaws.com/{PYTORCH_INFERENCE_REPO}:<tag> "
            "(see the AWS Deep Learning Containers list of available images)"
        )
    device = "gpu" if (instance_type and not serverless and is_gpu_instance(instance_type)) else "cpu"
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    tag = f"{PYTORCH_INFERENCE_VERSION}-{device}-{PYTORCH_INFERENCE_PY}"
    return f"{account}.dkr.ecr.{region}.{domain}/{PYTORCH_INFERENCE_REPO}:{tag}"
