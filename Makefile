# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLIPDEX := $(VENV)/bin/clipdex
STAMP := $(VENV)/.installed
DEMO_INDEX := data/demo-index
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install browser bench bench-scale soak clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# Peers' code that tests check clipdex against. Both packages' dependency lists drag in
	# much more than the parts used here (a metric, a client module), hence --no-deps.
	$(PY) -m pip install --quiet --no-deps clip-benchmark==1.6.2 clip-retrieval==2.45.0
	touch $(STAMP)

install: $(STAMP)

# The README's tour runs curl (installed when missing and we may); the browser test needs
# Debian's Chromium, installed when we may, else that test skips.
browser:
	@command -v curl >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && (apt-get install -y -qq curl >/dev/null 2>&1 \
	           || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq curl >/dev/null 2>&1)); } \
	  || echo "curl is not installed and cannot be installed here: the README tour test will fail"
	@command -v chromium >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && (apt-get install -y -qq chromium >/dev/null 2>&1 \
	           || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)); } \
	  || echo "chromium is not installed and cannot be installed here: the browser test will skip"

# The demo photographs install with scikit-image; the indexer copies them into data/demo.
# A new default model makes the old demo index refuse its queries: rebuild it then.
$(DEMO_INDEX)/CURRENT: retrieval/models/bundled/clipdex-default.safetensors | $(STAMP)
	rm -rf $(DEMO_INDEX)
	$(CLIPDEX) index build data/demo --out $(DEMO_INDEX)

run: $(STAMP) $(DEMO_INDEX)/CURRENT
	$(CLIPDEX) demo -k 3 "a cat" "a rocket launch"
	$(CLIPDEX) serve --index $(DEMO_INDEX) --host 127.0.0.1 --port 8000

test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# All benchmarks in one sequence (~15 min on 2 cores); writes docs/BENCHMARKS.md.
bench: $(STAMP)
	$(PY) bench/run_all.py

# The goal sizes: an index larger than RAM (10,000,000 x 512 under --max-memory 2GB; hours on
# 2 cores, ~30 GB of scratch disk), filtered search and the ANN at 1,000,000 vectors.
bench-scale: $(STAMP)
	$(PY) bench/run_all.py --parts disk,disk_1m,ray,ann,filtered,scaling --disk-count 10000000 \
	  --disk-memory 2GB --disk-index-type ivfpq-disk --disk-target-recall 0.92 \
	  --ann-count 1000000 --filtered-count 1000000 \
	  --scale-sizes 10000,100000,1000000

# The long reliability runs (crash loop with 100 random kills, Schemathesis, 30 s of
# overload, many Hypothesis examples; ~21 min on 2 cores); writes docs/RELIABILITY.md.
# It exits 1 when any check fails; the report says which.
soak: $(STAMP)
	$(PY) -m tests.reliability.soak

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_INDEX)
