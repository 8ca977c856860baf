# shmcache - every target does its own set-up, so `make test` / `make demo` work on a
# fresh Debian machine (OS packages via apt-get, Python packages into .venv).
#
#   make test         lint + typecheck + C engine under ASan/UBSan + pytest, plain and
#                     against an ASan/UBSan build of the extension
#   make demo         the Flask example under gunicorn (4 workers, shared memory + disk),
#                     loaded with and without the cache (shmcache demo)
#   make test-native  only the C engine tests (build/test_engine)
#   make test-asan-py the pytest suite against an ASan/UBSan build of the extension
#   make lint         ruff + mypy --strict
#   make bench        python benchmarks/run.py
#   make clean        remove build products (keeps .venv; `make distclean` drops it too)

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
MAKEFLAGS   += --no-print-directory

PYTHON ?= python3
BENCH_ARGS ?=
# Hard caps so a hung test fails the run instead of eating CI's time (make test must
# stay well under 15 minutes): seconds for the C tests and for pytest.
NATIVE_TIMEOUT ?= 300
PYTEST_TIMEOUT ?= 720
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# sudo only when we are not root (and only if it exists).
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

NATIVE_SRC := $(sort $(wildcard native/*.c))
NATIVE_HDR := $(sort $(wildcard native/*.h))
# Python-only C (the fast-path entry points) compiled into the extension, not the engine.
PYEXT_SRC  := $(sort $(wildcard native/py/*.c native/py/*.h))
TEST_SRC   := $(sort $(wildcard native/tests/*.c))
TEST_HDR   := $(sort $(wildcard native/tests/*.h))

ifeq ($(origin CC),default)
CC := gcc
endif
SAN_CFLAGS := -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
              -fno-omit-frame-pointer -Wall -Wextra -Werror -std=gnu11 -D_GNU_SOURCE -pthread
# Leak checking stays on; a UBSan report aborts the run with a stack trace.
SAN_ENV := ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
           UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# Stamps: .venv/.stamp-deps  = venv exists and the project + test deps are installed
#         .venv/.stamp-native = the cffi extension shmcache/_native*.so is up to date
DEPS_STAMP   := $(VENV)/.stamp-deps
NATIVE_STAMP := $(VENV)/.stamp-native

.PHONY: all setup os-deps test lint ruff mypy test-native pytest test-asan-py demo bench clean \
        distclean help

all: test

help:
	@sed -n '3,9p' Makefile

# ---- set-up --------------------------------------------------------------------------

# OS packages, installed only when something is missing (cheap no-op otherwise):
#   redis-server       the L2 tier the tests and benchmarks talk to (+ redis-cli for
#                      the cluster fixture)
#   chromium           the dashboard test drives a real headless Chromium
#   gcc / make / libc  build-essential (gcc brings libasan + libubsan for test-native)
#   python3-venv/-dev  only when the python3 in use lacks venv/ensurepip or Python.h
os-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v $(CC) >/dev/null 2>&1 || missing="$$missing build-essential"; \
	if command -v $(CC) >/dev/null 2>&1; then \
	  mkdir -p build; \
	  echo 'int main(void){return 0;}' > build/.sanprobe.c; \
	  $(CC) -fsanitize=address,undefined build/.sanprobe.c -o build/.sanprobe >/dev/null 2>&1 \
	    || missing="$$missing build-essential"; \
	  rm -f build/.sanprobe build/.sanprobe.c; \
	fi; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	$(PYTHON) -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing OS packages:$$missing"; \
	  $(SUDO) apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The venv and every Python dependency (runtime + test).  `pip install -e` also builds
# the cffi extension into shmcache/ (an editable install compiles it in place).
$(DEPS_STAMP): pyproject.toml setup.py | os-deps
	@[ -x $(PY) ] || { echo ">> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> pip install -e '.[test]'"
	$(PIP) install -q 'setuptools>=68' wheel 'cffi>=1.16'
	$(PIP) install -q --no-build-isolation -e '.[test]'
	@touch $(DEPS_STAMP) $(NATIVE_STAMP)

# Rebuild the extension when the engine's C sources, headers or the cffi build script
# change (a fresh venv gets the extension from the install above and skips this).
# Re-running the editable install is what reliably rebuilds and re-copies the .so into
# shmcache/ (no deps re-resolved, no build isolation: the build deps are in the venv).
$(NATIVE_STAMP): $(NATIVE_SRC) $(NATIVE_HDR) $(PYEXT_SRC) native/build_ffi.py | $(DEPS_STAMP)
	@so=$$(ls -t shmcache/_native*.so 2>/dev/null | head -n1 || true); \
	if [ -z "$$so" ] || [ -n "$$(find $^ -newer "$$so" | head -n1)" ]; then \
	  echo ">> rebuilding the cffi extension"; \
	  $(PIP) install -q --no-deps --no-build-isolation -e .; \
	fi
	@touch $(NATIVE_STAMP)

setup: os-deps $(NATIVE_STAMP)

# ---- checks --------------------------------------------------------------------------

test: setup
	@$(MAKE) lint
	@$(MAKE) test-native
	@$(MAKE) pytest
	@$(MAKE) test-asan-py
	@echo ">> make test: all green"

lint: ruff mypy

ruff: setup
	$(VENV)/bin/ruff check shmcache tests benchmarks examples

mypy: setup
	$(VENV)/bin/mypy --strict shmcache

build/test_engine: $(NATIVE_SRC) $(NATIVE_HDR) $(TEST_SRC) $(TEST_HDR) Makefile
	@mkdir -p build
	$(CC) $(SAN_CFLAGS) -Inative -o $@ $(NATIVE_SRC) $(TEST_SRC) -lrt

test-native: os-deps build/test_engine
	$(SAN_ENV) timeout -k 10 $(NATIVE_TIMEOUT) ./build/test_engine

pytest: setup
	timeout -k 30 $(PYTEST_TIMEOUT) $(VENV)/bin/pytest -q

# The engine and cache-API part of the Python suite against the extension built with
# ASan/UBSan (SHMCACHE_SANITIZE), so the direct-call entry points (native/py/fastpath.c)
# and every engine path the tests reach run under the sanitizers too.  The server,
# framework, Redis and browser tests add no C paths of their own and stay out (they
# would only slow the sanitized run down).  Built in a copy under build/ so the normal
# extension in shmcache/ is untouched; python itself is not instrumented, hence the
# preloaded runtime and no leak checking (the interpreter's own allocations).
ASAN_PY := build/asan-py
ASAN_TESTS = $(filter-out tests/test_http% tests/test_gunicorn% tests/test_catzilla% \
               tests/test_contrib% tests/test_cli% tests/test_dashboard% tests/test_metrics% \
               tests/test_cluster% tests/test_tier_faults% tests/test_sidecar% \
               tests/test_examples% tests/test_demo%, \
               $(sort $(wildcard tests/test_*.py)))
test-asan-py: setup
	rm -rf $(ASAN_PY) && mkdir -p $(ASAN_PY)
	cp -r shmcache native tests pyproject.toml $(ASAN_PY)/
	rm -rf $(ASAN_PY)/shmcache/_native*.so $(ASAN_PY)/shmcache/__pycache__ $(ASAN_PY)/tests/__pycache__
	cd $(ASAN_PY) && SHMCACHE_SANITIZE=1 $(CURDIR)/$(PY) native/build_ffi.py >build.log 2>&1 \
	  || { cat build.log; exit 1; }
	cd $(ASAN_PY) && LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  timeout -k 30 $(PYTEST_TIMEOUT) $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider \
	    $(ASAN_TESTS)

# ---- demo / bench --------------------------------------------------------------------

demo: setup
	$(VENV)/bin/shmcache demo

# The benchmark's competitors (other caches, redis client, numpy): once per pyproject.
$(VENV)/.stamp-bench: $(DEPS_STAMP)
	$(PIP) install -q --no-build-isolation -e '.[bench]'
	@touch $@ $(NATIVE_STAMP)

bench: setup $(VENV)/.stamp-bench
	$(PY) benchmarks/run.py $(BENCH_ARGS)

# ---- cleaning ------------------------------------------------------------------------

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f shmcache/_native*.so shmcache/_native.c shmcache/_native.o $(NATIVE_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0r rm -rf

distclean: clean
	rm -rf $(VENV)
