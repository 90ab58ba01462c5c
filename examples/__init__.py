"""Short scripts a user copies, each run end to end by tests/test_examples.py (a package, so that
`--task examples.custom_task:make_task` imports from the repository root; not installed with distrib)."""
