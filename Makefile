# The README's two commands: `make run` (install and start kvmtagd) and `make test` (install
# what the suite needs on a fresh Debian/Ubuntu machine, apt-get included: root or sudo, and run
# it).
PYTHON ?= python3
VENV ?= .venv
APT_PACKAGES = gcc make libc6-dev libffi-dev linux-libc-dev linux-libc-dev-arm64-cross valgrind \
  systemd strace
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test run deps venv lint clean

test: deps venv
	$(VENV)/bin/python -m pytest -q

lint: venv
	$(VENV)/bin/ruff check kvmtag tests cdefs clients
	$(VENV)/bin/mypy

run: deps venv
	$(VENV)/bin/kvmtagd -v $(KVMTAGD_ARGS)

# Only calls apt-get when a package is missing, so a warm machine needs neither root nor network.
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing with apt-get: $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg setup.py pyproject.toml cdefs/*.c cdefs/*.h cdefs/*.py
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info kvmtag/_tagkernel*.so kvmtag/_tagkernel.c
