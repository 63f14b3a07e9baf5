"""Scripts the tests run as subprocesses (`python tests/workers/<name>.py ...`) and the config
modules they share with the tests that start them."""
