# Self-installing entry points: `make demo` runs the embedded default, `make test` runs the tests.
# torch/torchvision are pinned and installed first so that nothing else pulls another torch build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.causvid-installed
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean-data

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/causvid run

test: $(STAMP)
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(VENV)/bin/causvid bench inference
	$(VENV)/bin/causvid bench data
	$(VENV)/bin/causvid bench train

clean-data:
	rm -rf causvid-data
