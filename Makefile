# Two commands from a fresh clone:
#   make test   set up .venv if needed, then run the whole test suite
#   make demo   set up .venv if needed, then the whole study on scikit-learn's digits
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CKPT := checkpoints
BASE := $(CKPT)/resnet18_digits_base.pt
GOLD := $(CKPT)/resnet18_digits_cf0.pt
GOLD_RF := $(CKPT)/resnet18_digits_rf0.1.pt

.PHONY: setup test demo demo-random clean-demo

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

$(BASE): | $(STAMP)
	$(PY) train.py --dataset digits --epochs 10 --batch-size 64 --lr 0.1 -NL

$(GOLD): | $(STAMP)
	$(PY) train.py --dataset digits --epochs 10 --batch-size 64 --lr 0.1 --cf 0 -NL

$(GOLD_RF): | $(STAMP)
	$(PY) train.py --dataset digits --epochs 10 --batch-size 64 --lr 0.1 --unlr 0.1 -NL

# The demo's run folder and its analysis are rebuilt on every `make demo`.
DEMO := output/demo
DEMO_FEATURES := features/checkpoints features/$(DEMO)

demo: $(BASE) $(GOLD)
	$(PY) base_test.py -c $(BASE) $(GOLD) --no-mia --out output/demo_models.json
	rm -rf $(DEMO) $(DEMO_FEATURES) images/checkpoints images/$(DEMO)
	$(PY) main.py -L exp/demo.json --nexp 3 -NL --name demo
	$(PY) feature_extraction.py -D $(CKPT) $(DEMO) -S 500
	$(PY) tsne_vis.py -S 300 --folders $(DEMO_FEATURES)
	$(PY) wasserstein.py -S 500 --folders $(DEMO_FEATURES)
	@echo "summary: $(DEMO)/summary.md; plots: $(DEMO)/*.png, images/"

# Random forgetting of 10%, where doing nothing is the baseline to beat (about 3 minutes).
demo-random: $(BASE) $(GOLD_RF)
	rm -rf output/demo_random
	$(PY) main.py -L exp/demo_random.json --nexp 3 -NL --name demo_random

clean-demo:
	rm -rf $(BASE) $(GOLD) $(GOLD_RF) $(BASE:.pt=_forget.json) $(GOLD:.pt=_forget.json) $(GOLD_RF:.pt=_forget.json) output/demo_random $(DEMO) $(DEMO_FEATURES) images/checkpoints images/$(DEMO)
