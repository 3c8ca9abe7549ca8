"""A package outside mlmjax holding a toy task, to show that a task is one file (tests/test_toy_task.py)."""
