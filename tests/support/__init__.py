"""Code the tests share; fixtures stay in tests/conftest.py. Import as `from tests.support.X import ...`.

- paths: the repository root.
- net: free loopback ports.
- cli: run the real CLI (subprocess or in process) and check its one-line errors.
- training: the tiny fit settings, weight comparisons, one reference run per session.
- aws: moto's server, an IMDSv2 stand-in, a fault-injecting proxy in front of moto.
- aws_recorder: a recording hop in front of moto that also serves EC2 placement groups (and canned answers).
- job_nodes: a job's instances on one machine: a fake IMDSv2 each, runner processes that can freeze or die.
- images: photo-like test images and hand-made PNGs (decompression bombs).
- lambda_env: the Lambda function's modules and the local servers its tests talk to.
- ddp_probe: a torchrun entry point (run by path, not imported).
"""
