# `make test` and `make demo` create .venv on first use and install calibnet into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.calibnet-installed
DEMO_DATA ?= $(CURDIR)/calibnet_data

.PHONY: install test demo clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

# pytest exits 5 when it collects no test; that is not a failure of the suite itself.
test: $(STAMP)
	$(BIN)/python -m pytest -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: $(STAMP)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_convert synthetic -d 501 --overwrite
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_plan_and_preprocess -d 501

clean-demo:
	rm -rf $(DEMO_DATA)
