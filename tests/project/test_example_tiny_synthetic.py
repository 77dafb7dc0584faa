"""The tiny example's tests (examples/tiny_synthetic/tests/), collected with the suite."""

from examples.tiny_synthetic.tests.test_tiny_synthetic import *  # noqa: F403
