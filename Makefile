# fovea_vla developer entry points. `make demo` and `make test` are all a new machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMPS := $(VENV)/.fovea_stamps
REQUIREMENTS := $(wildcard requirements/*.txt)
MSG_SOURCES := fovea_vla_msgs/CMakeLists.txt fovea_vla_msgs/package.xml $(wildcard fovea_vla_msgs/msg/*.msg fovea_vla_msgs/srv/*.srv)
DEMO_SECONDS ?= 20
PYTEST_ARGS ?=

# Loopback-only DDS for everything started from here (tests pick their own domain ids).
# The venv runs Jazzy, where ROS_LOCALHOST_ONLY is deprecated in favour of this.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export AMENT_PREFIX_PATH := $(abspath $(VENV))

.PHONY: all install demo test test-gpu lint fuzz clean distclean

all: install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMPS)/requirements: $(REQUIREMENTS) | $(BIN)/python
	@mkdir -p $(STAMPS)
	@echo "[fovea_vla] installing pinned requirements into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/python -m pip install --disable-pip-version-check -r requirements/ros.txt -r requirements/build.txt \
	    -r requirements/base.txt -r requirements/dev.txt > $(VENV)/pip.log 2>&1 \
	    && $(BIN)/python -m pip install --disable-pip-version-check --no-deps -r requirements/nodeps.txt \
	    >> $(VENV)/pip.log 2>&1 \
	    || { grep -v '^WARNING: Location' $(VENV)/pip.log | tail -n 30; exit 1; }
	@touch $@

$(STAMPS)/msgs: $(STAMPS)/requirements $(MSG_SOURCES)
	@echo "[fovea_vla] building fovea_vla_msgs into $(VENV) (log: build/fovea_vla_msgs.log)"
	@mkdir -p build
	@export PATH=$(abspath $(BIN)):$$PATH; \
	{ cmake -S fovea_vla_msgs -B build/fovea_vla_msgs -G Ninja -DBUILD_TESTING=OFF \
	    -DCMAKE_PREFIX_PATH=$(abspath $(VENV)) -DCMAKE_INSTALL_PREFIX=$(abspath $(VENV)) \
	    -DPython3_EXECUTABLE=$(abspath $(BIN))/python \
	  && cmake --build build/fovea_vla_msgs && cmake --install build/fovea_vla_msgs; } \
	  > build/fovea_vla_msgs.log 2>&1 || { tail -n 40 build/fovea_vla_msgs.log; exit 1; }
	@touch $@

$(STAMPS)/package: $(STAMPS)/msgs setup.py setup.cfg package.xml
	@echo "[fovea_vla] installing fovea_vla (editable)"
	@$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . \
	    > $(VENV)/pip-package.log 2>&1 || { tail -n 30 $(VENV)/pip-package.log; exit 1; }
	@touch $@

install: $(STAMPS)/package

demo: install
	$(BIN)/fovea-vla demo --duration $(DEMO_SECONDS) --out out/demo

lint: install
	$(BIN)/ruff check fovea_vla test launch setup.py

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-gpu: install
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# The fuzz tests with 25 times the examples `make test` runs, freshly random each time (test/conftest.py).
fuzz: install
	FOVEA_FUZZ_PROFILE=fuzz $(BIN)/python -m pytest test/fuzz --hypothesis-show-statistics $(PYTEST_ARGS)

clean:
	rm -rf build out .pytest_cache .ruff_cache .hypothesis

distclean: clean
	rm -rf $(VENV)
