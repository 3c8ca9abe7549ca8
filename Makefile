# The README's two commands, for those who prefer make; both create .venv on first use.
.PHONY: demo test

demo:
	python3 quickstart.py demo

test:
	python3 quickstart.py test
