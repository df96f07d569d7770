"""ec2train: train image classifiers on EC2 GPU boxes in plain PyTorch.

Kept import-free on purpose: `ec2train.model` and `ec2train.preprocess` are shipped
inside the SageMaker model package, where only torch, torchvision and Pillow exist.
"""

__version__ = "0.1.0"
