"""ec2train's tests. Shared code lives in tests/support/; fixtures in tests/conftest.py."""
