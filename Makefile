# Quick start:  make demo   (set up .venv, run the bundle chain on the sample data at demo size, on CPU)
#               make test   (set up .venv, run the test suite)
# GPU hosts: TORCH='torch==2.13.0 --index-url <your CUDA wheel index>' make demo, or install torch yourself first.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.meduet-installed
# MONAI Label 0.8.5 needs its own virtualenv (numpy<2, pydicom<3); pins explained in DEVELOPERS.md
MLVENV ?= .venv-monailabel
MLSTAMP := $(MLVENV)/.meduet-installed
MONAILABEL_PINS := 'monai[nibabel,pydicom,fire,pyyaml,einops,ignite]==1.6.1' 'monailabel==0.8.5' 'pydicom<3' \
	'dicomweb-client<0.60' 'pynetdicom<3'

# MONAI Deploy App SDK 4.0.0 (Holoscan) for apps/meduet_seg_app, in its own virtualenv; pins explained in DEVELOPERS.md
DEPVENV ?= .venv-deploy
DEPSTAMP := $(DEPVENV)/.meduet-installed
DEPLOY_PINS := 'monai-deploy-app-sdk==4.0.0' 'holoscan-cu13==4.2.0' 'holoscan-cli==4.2.0' \
	'monai[nibabel,pydicom,fire,pyyaml,einops,ignite]==1.6.1' 'highdicom==0.28.2' 'pydicom==3.0.2'

.PHONY: setup monailabel-setup deploy-setup demo test sample clean-outputs

# a new virtualenv takes ~3.5 GB; pip's "No space left on device" halfway through is harder to read than this
define need_space
	@test -x $(2)/bin/python || { free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
		if [ "$$free" -lt $(1) ]; then echo "make: $$free GB free in $(CURDIR); a new $(2) needs ~$(1) GB:" \
		"free some space and run make again" >&2; exit 1; fi; }
endef

$(STAMP): pyproject.toml Makefile
	$(call need_space,4,$(VENV))
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[data,test,export,tracking]"
	touch $(STAMP)

setup: $(STAMP)

$(MLSTAMP): pyproject.toml Makefile
	$(call need_space,4,$(MLVENV))
	test -x $(MLVENV)/bin/python || $(PYTHON) -m venv $(MLVENV)
	$(MLVENV)/bin/python -m pip install --quiet --upgrade pip
	$(MLVENV)/bin/python -m pip install --quiet $(TORCH) $(MONAILABEL_PINS)
	$(MLVENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(MLSTAMP)

monailabel-setup: $(MLSTAMP)

$(DEPSTAMP): pyproject.toml Makefile
	$(call need_space,3,$(DEPVENV))
	test -x $(DEPVENV)/bin/python || $(PYTHON) -m venv $(DEPVENV)
	$(DEPVENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEPVENV)/bin/python -m pip install --quiet $(TORCH)
	$(DEPVENV)/bin/python -m pip install --quiet $(DEPLOY_PINS)
	$(DEPVENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(DEPSTAMP)

deploy-setup: $(DEPSTAMP)

sample: setup
	$(BIN)/python -m meduet.data.sample --out data/sample --pretrain-subjects 72 --longitudinal-subjects 16

demo: setup
	$(BIN)/python tools/demo.py --out outputs/demo --preset demo

# the three virtualenvs are built two at a time (3.5 instead of 6 min on 2 cores for the first two), then the suite
# runs; it has built MONAI Label's and MONAI Deploy's virtualenvs, so their tests must run here
# (MEDUET_REQUIRE_MONAILABEL / MEDUET_REQUIRE_DEPLOY turn their skips into failures)
test:
	$(MAKE) -j2 setup monailabel-setup deploy-setup
	MEDUET_REQUIRE_MONAILABEL=1 MEDUET_REQUIRE_DEPLOY=1 $(BIN)/python -m pytest -q

clean-outputs:
	rm -rf outputs data/sample bundles/*/models/*.pt bundles/*/models/*/ bundles/*/eval bundles/*/runs \
		bundles/*/latents bundles/*/latents_control
