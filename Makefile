# Two commands do all the set-up:  `make serve`  and  `make test`.
# `make chat` opens the terminal chat instead of the WebSocket server.
# Both create .venv on first use. See docs/install.md for choosing another torch build.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmchat-installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# Machines that carry a local wheel cache (such as torch's CPU wheel) keep it in /opt/wheels.
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
ARGS ?=

.PHONY: setup serve chat test lint bench system-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(PLUGINS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(PIP_LOCAL) -c constraints.txt \
		-e '.[test]' $(foreach p,$(dir $(PLUGINS)),-e $(p))
	touch $(STAMP)

# espeak-ng speaks the voice clips that tests and the demo corpus use; chromium runs the
# web page's browser tests (tests/test_web.py skips them, saying so, if it cannot be installed).
system-deps:
	@command -v espeak-ng >/dev/null || { \
		echo "installing espeak-ng (Debian package)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q espeak-ng >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q espeak-ng >/dev/null; }; }
	@command -v chromium >/dev/null || { \
		echo "installing chromium (Debian package) for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q chromium >/dev/null || { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; } \
		|| echo "could not install chromium; the browser tests will be skipped"; }

serve: setup
	$(PY) -m mmchat serve $(ARGS)

chat: setup
	$(PY) -m mmchat chat $(ARGS)

test: setup system-deps
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check mmchat plugins tests bench
	$(VENV)/bin/mypy  # strict over the public API and docs/examples ([tool.mypy])

bench: setup system-deps
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
