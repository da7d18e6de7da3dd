"""Real components the tests and benches run: brought up from Debian packages, torn down after."""
