# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
KODAK  ?= ../shared/data/kodak
# Extras to install: `dev` for tests and CI; the Docker image runs `make venv EXTRAS=` (runtime only).
EXTRAS ?= dev
SPEC   := $(if $(EXTRAS),.[$(EXTRAS)],.)

.PHONY: run test lint demo eval train bench clean venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	# torch 2.14.1 / torchvision 0.29.1 come from this machine's disk (see README, "Set-up").
	$(PY) -m pip install --quiet --disable-pip-version-check -e '$(SPEC)'
	@touch $(STAMP)

## Create the virtual environment and install the package (the Dockerfile's install step too).
venv: $(STAMP)

## Start the HTTP service on its embedded defaults (127.0.0.1:8000, state in ./data, shipped weights).
run: $(STAMP)
	$(VENV)/bin/compass-serve serve

demo: $(STAMP)
	@mkdir -p runs/demo
	$(VENV)/bin/compass-serve models
	$(VENV)/bin/compass-serve encode $(KODAK)/kodim23.png runs/demo/kodim23.cmp
	$(VENV)/bin/compass-serve info runs/demo/kodim23.cmp
	$(VENV)/bin/compass-serve decode runs/demo/kodim23.cmp -o runs/demo/kodim23-w300.png --width 300
	$(VENV)/bin/compass-serve decode runs/demo/kodim23.cmp -o runs/demo/kodim23-full.png

## Run the test suite (bootstraps the environment first).
test: $(STAMP)
	$(VENV)/bin/ruff check service tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check service tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
