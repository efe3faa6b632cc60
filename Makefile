# The README's two commands. Each installs what it needs first (hack/setup.sh), so both work
# on a fresh machine and are fast the second time.
.PHONY: setup sandbox test lint proto

PY := .venv/bin/python

setup:
	hack/setup.sh

sandbox: setup
	.venv/bin/podwire sandbox up

test: setup
	hack/test.sh

proto: setup
	$(PY) hack/genproto.py
