# `make test` and `make demo` create .venv on first use and install calibnet into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.calibnet-installed
SAM2_REQUIREMENT := sam2==1.1.0
DEMO_DATA ?= $(CURDIR)/calibnet_data
# The demo: a small 2d benchmark (4 cases per center at 64³: Siemens 6 train + 2 val, GE/Philips 8 test)
# sized to converge in about a quarter of an hour on 2 CPU cores: nnU-Net 2d (100 steps), a confidence
# head on it, and SAM-FT / CalSAM fine-tuned with box prompts on the pretrained LiteMedSAM (30 steps each;
# LiteMedSAM was trained with boxes, so box fine-tuning shows within a few dozen steps where points need
# hundreds; CalSAM's Fisher penalty slows early fitting: 0.70 source DSC after 20 steps, 0.74 after 30). Every slice with foreground is encoded once by LiteMedSAM's encoder (~2 s each on a CPU),
# which is most of the SAM rows' time. Each stage's seconds go to $(DEMO_STAGES).
DEMO_DATASET ?= --cases-per-center 4
DEMO_CONFIGURATION ?= 2d
DEMO_SPLIT ?= --split scanner --disable-tta
DEMO_NNUNET ?= --epochs 4 --iters-per-epoch 25
DEMO_HEAD ?= --epochs 2 --iters-per-epoch 15 --warmup-batches 10
DEMO_SAM ?= --epochs 3 --iters-per-epoch 10 --sam-prompt box
DEMO_STAGES = $(DEMO_DATA)/demo_stages.md
DEMO_EVALUATION = $(DEMO_DATA)/results/Dataset501_SynthBrain/evaluation/scanner

# $(call demo_stage,NAME,COMMAND ARGS): run a calibnet command on the demo data, append its seconds
define demo_stage
	@echo "== demo stage $(1)"; start=$$(date +%s); CALIBNET_DATA=$(DEMO_DATA) $(BIN)/$(2) || exit $$?; \
	  echo "| $(1) | $$(( $$(date +%s) - start )) |" >> $(DEMO_STAGES)
endef

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
	@mkdir -p $(DEMO_DATA) && printf '| stage | seconds |\n|---|---|\n' > $(DEMO_STAGES)
	$(call demo_stage,calib_convert synthetic,calib_convert synthetic -d 501 --overwrite $(DEMO_DATASET))
	$(call demo_stage,calib_plan_and_preprocess,calib_plan_and_preprocess -d 501 -c $(DEMO_CONFIGURATION))
	$(call demo_stage,calib_train nnunet,calib_train 501 $(DEMO_CONFIGURATION) nnunet 0 $(DEMO_SPLIT) $(DEMO_NNUNET))
	$(call demo_stage,calib_train confidence_head,calib_train 501 $(DEMO_CONFIGURATION) confidence_head 0 $(DEMO_SPLIT) --base nnunet $(DEMO_HEAD))
	$(call demo_stage,calib_train samft,calib_train 501 $(DEMO_CONFIGURATION) samft 0 $(DEMO_SPLIT) $(DEMO_SAM))
	$(call demo_stage,calib_train calsam,calib_train 501 $(DEMO_CONFIGURATION) calsam 0 $(DEMO_SPLIT) $(DEMO_SAM))
	$(call demo_stage,calib_evaluate,calib_evaluate --split scanner --configuration $(DEMO_CONFIGURATION))
	@awk -F'|' 'NR > 2 {total += $$3} END {print "| total | " total " |"}' $(DEMO_STAGES) >> $(DEMO_STAGES)
	@cat $(DEMO_STAGES)

# regenerate docs/example_report/ from the demo's evaluation (run `make demo` first)
example-report:
	rm -rf docs/example_report && mkdir -p docs/example_report
	cp $(DEMO_EVALUATION)/report.md $(DEMO_EVALUATION)/*.png $(DEMO_EVALUATION)/*.pdf $(DEMO_EVALUATION)/per_center.md \
	  $(DEMO_EVALUATION)/tables.tex docs/example_report/
	{ printf '# Example report: `make demo`\n\n'; \
	  printf 'report.md is what `calib_evaluate --split scanner --configuration 2d` wrote after `make demo` (see the\n'; \
	  printf 'Makefile and docs/calib_evaluate.md); tables.tex holds its LaTeX tables, and each figure is also a vector\n'; \
	  printf 'PDF. Seconds each stage took, on this machine:\n\n'; \
	  cat $(DEMO_STAGES); } > docs/example_report/README.md

clean-demo:
	rm -rf $(DEMO_DATA)
