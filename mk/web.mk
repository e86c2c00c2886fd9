# The web page's browser test (tests/integration/test_web.py) drives Debian's chromium headless through Playwright
# (the Python package, in the dev extra). Playwright never downloads a browser of its own: the test points it at
# /usr/bin/chromium, installed here once per machine (the stamp), as Prometheus is in deploy.mk.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

$(STAMPS)/chromium: | $(STAMPS)/prometheus  # one apt-get at a time (dpkg's lock)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }
	@mkdir -p $(STAMPS) && touch $@

.PHONY: chromium
chromium: $(STAMPS)/chromium  ## install Debian's chromium (the web page's browser test)

TEST_DEPS += $(STAMPS)/chromium
