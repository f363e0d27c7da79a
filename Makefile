# The two README commands: `make demo` and `make test`. Each bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test chromium clean constraints

# pyproject.toml declares ranges; constraints.txt pins the exact versions CI and the images run.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# After changing pyproject.toml: install what the new ranges need (old pins stay where they still fit),
# then pin what .venv runs. Check the suite before committing the new constraints.txt.
constraints:
	$(PY) -m pip install -q -e '.[test]'
	{ echo "# Exact versions of everything .venv runs: pip install -c constraints.txt -e '.[test]' (make does)."; \
	  echo "# Rewritten by 'make constraints'; pyproject.toml holds the compatible ranges."; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt

demo: $(STAMP)
	$(PY) -m jobs.demo

test: $(STAMP) chromium
	$(PY) -m pytest -q -m "not gpu" --timeout 900 --durations=25

# Debian's Chromium for the report's browser test; skipped (with a reason) where it cannot be installed.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed: the report's browser test will be skipped"

clean:
	rm -rf $(VENV) stores out data
