# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-streams test-tls lint bench-quality bench-throughput bench-wire bench-faults bench-soak bench-plc bench-cluster-memory clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/crd demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# The tests that talk to the server, e.g. against your own: REDIS_URL=redis://host:6379/0 make test-streams
test-streams: $(STAMP)
	$(PY) -m pytest tests/test_streams.py tests/test_producer.py tests/test_worker.py tests/test_results.py \
		tests/test_plc.py tests/test_dashboard.py

# TLS end to end with Debian's redis-server --tls-port (its own server; REDIS_URL is not used).
test-tls: $(STAMP)
	$(PY) -m pytest tests/test_tls.py tests/test_secrets.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-quality: $(STAMP)
	$(PY) bench/quality.py

bench-throughput: $(STAMP)
	$(PY) bench/throughput.py

bench-wire: $(STAMP)
	$(PY) bench/wire.py

# 1,000 faults against producers, workers and their own server (~30 minutes).
bench-faults: $(STAMP)
	$(PY) bench/faults.py

# 10 minutes at a fixed rate with faults now and then: memory growth, latency drift, losses.
bench-soak: $(STAMP)
	$(PY) bench/soak.py

bench-plc: $(STAMP)
	$(PY) bench/plc.py

# Redis memory per line on a local 3-master cluster (needs redis-server and redis-cli; ~10 s).
bench-cluster-memory: $(STAMP)
	$(PY) bench/cluster_memory.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
