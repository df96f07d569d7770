"""Unattended training jobs on EC2 (see docs/jobs.md)."""
