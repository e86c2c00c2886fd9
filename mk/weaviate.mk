# The Weaviate server, built from source once per machine (pure Go, no cgo): the Weaviate backend's tests and
# benchmarks run the real server on loopback. It lands in .venv/bin (make clean removes it with the venv); the
# versioned stamp makes a second run instant and a version bump rebuild. Measured: ~3 min on 2 cores, cold module
# cache (../shared/FACTS.md: module github.com/weaviate/weaviate, Go >= 1.26).
WEAVIATE_VERSION := v1.39.0
WEAVIATE_BIN     := $(VENV)/bin/weaviate-server

$(STAMPS)/weaviate-$(WEAVIATE_VERSION): $(STAMPS)/base
	@command -v go >/dev/null || { echo "Go >= 1.26 is needed to build the Weaviate server (https://go.dev/dl/)"; exit 1; }
	CGO_ENABLED=0 GOBIN=$(abspath $(VENV)/bin) go install github.com/weaviate/weaviate/cmd/weaviate-server@$(WEAVIATE_VERSION)
	@mkdir -p $(STAMPS) && touch $@

.PHONY: weaviate
weaviate: $(STAMPS)/weaviate-$(WEAVIATE_VERSION)  ## build the Weaviate server (the Weaviate backend's tests need it)

setup: $(STAMPS)/weaviate-$(WEAVIATE_VERSION)
TEST_DEPS += $(STAMPS)/weaviate-$(WEAVIATE_VERSION)
