# `make test` and `make demo` create .venv on first use and install calibnet into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.calibnet-installed
SAM2_REQUIREMENT := sam2==1.1.0
DEMO_DATA ?= $(CURDIR)/calibnet_data
# a short training: enough to exercise the whole pipeline on 2 CPU cores, not to converge; 4 cases per
# center, because the pretrained SAM rows (LiteMedSAM) encode every slice with foreground once (~2 s each)
DEMO_TRAIN ?= --split scanner --epochs 2 --iters-per-epoch 10 --disable-tta
DEMO_DATASET ?= --cases-per-center 4

.PHONY: install test demo clean-demo example-report

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[test]"
	# sam2 is published as a source distribution whose build imports torch: build it against the installed
	# torch (no isolation), without its optional CUDA extension
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --no-build-isolation "$(SAM2_REQUIREMENT)"
	touch $(STAMP)

# pytest exits 5 when it collects no test; that is not a failure of the suite itself.
test: $(STAMP)
	$(BIN)/python -m pytest -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: $(STAMP)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_convert synthetic -d 501 --overwrite $(DEMO_DATASET)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_plan_and_preprocess -d 501 -c 3d_fullres
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_train 501 3d_fullres nnunet 0 $(DEMO_TRAIN)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_train 501 3d_fullres calunet 0 $(DEMO_TRAIN)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_train 501 3d_fullres confidence_head 0 $(DEMO_TRAIN) --base nnunet --warmup-batches 10
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_train 501 3d_fullres samft 0 $(DEMO_TRAIN)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_train 501 3d_fullres calsam 0 $(DEMO_TRAIN)
	CALIBNET_DATA=$(DEMO_DATA) $(BIN)/calib_evaluate --split scanner

# regenerate docs/example_report/ from the demo's evaluation (run `make demo` first)
example-report:
	rm -rf docs/example_report && mkdir -p docs/example_report
	cp $(DEMO_DATA)/results/Dataset501_SynthBrain/evaluation/scanner/report.md \
	   $(DEMO_DATA)/results/Dataset501_SynthBrain/evaluation/scanner/*.png \
	   $(DEMO_DATA)/results/Dataset501_SynthBrain/evaluation/scanner/per_center.md docs/example_report/

clean-demo:
	rm -rf $(DEMO_DATA)
