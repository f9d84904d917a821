# Set-up on a fresh machine: `make demo` and `make test` create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch; an unpinned `torch` may pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test test-all bench lint install install-test clean models model-shapes model-fashion model-shapes-clip model-shapes-noisy-clip fashion-mnist browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[server]"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

# Fashion-MNIST from Debian (dataset-fashion-mnist): installed when missing and root, else one line saying what to run
fashion-mnist:
	sh scripts/ensure-fashion-mnist

# Debian's chromium, which the tests of the server's page drive with Playwright
browser:
	sh scripts/ensure-browser

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/daguerre generate "a red circle above a blue square" --seed 1 --out demo.png --overwrite
	@echo "wrote demo.png"

test: $(VENV)/.installed-test fashion-mnist browser
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q --durations=25 tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests bench

bench: $(VENV)/.installed-test
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info

# The shipped default models, reproduced from their configs (docs/models.md): each stage resumes from its
# last checkpoint when interrupted; the finished model is copied into the package and evaluated.
RUNS ?= runs
SHIPPED := src/daguerre/assets/models

models: model-shapes model-fashion model-shapes-clip model-shapes-noisy-clip

model-shapes model-fashion: model-%: $(RUNS)/%_ldm/model.safetensors
	cp $< $(SHIPPED)/$*.safetensors
	$(VENV)/bin/daguerre eval --model $(SHIPPED)/$*.safetensors --out $(RUNS)/$*_eval --overwrite

$(RUNS)/%_vae/vae.safetensors: | $(VENV)/.installed
	$(VENV)/bin/daguerre train vae --config $*_vae --out $(RUNS)/$*_vae --resume

$(RUNS)/%_ldm/model.safetensors: $(RUNS)/%_vae/vae.safetensors
	$(VENV)/bin/daguerre train ldm --config $*_ldm --vae $< --out $(RUNS)/$*_ldm --resume

# The shapes CLIP (assets/clip/shapes-clip.safetensors, its card beside it): one run in three phases (its card):
# the config's 2400-step cosine to step 1750, continued on the cosine of a 4400-step run to step 2500, then on
# that of a 5400-step run to its end; copied into the package and measured zero-shot on held-out single objects.
SHIPPED_CLIPS := src/daguerre/assets/clip
SHAPES_CLIP := $(VENV)/bin/daguerre train clip --config shapes_clip --out $(RUNS)/shapes_clip --resume

model-shapes-clip: $(RUNS)/shapes_clip/clip.safetensors
	cp $< $(SHIPPED_CLIPS)/shapes-clip.safetensors
	$(VENV)/bin/daguerre train zero-shot $(SHIPPED_CLIPS)/shapes-clip.safetensors --n 1000 \
		--json $(RUNS)/shapes_clip/zero_shot.json

# The noise-aware CLIP of the shipped shapes model's latents (assets/clip/shapes-noisy-clip.safetensors, its card
# beside it; docs/clip.md), its text tower the shipped shapes-clip's: the config's 2000-step cosine, paused at step
# 1250 (what the session's time allowed) and that checkpoint's EMA weights exported.
SHAPES_NOISY_CLIP := $(VENV)/bin/daguerre train clip --config shapes_noisy_clip --out $(RUNS)/shapes_noisy_clip --resume

model-shapes-noisy-clip: $(RUNS)/shapes_noisy_clip/clip_1250.safetensors
	cp $< $(SHIPPED_CLIPS)/shapes-noisy-clip.safetensors
	$(VENV)/bin/daguerre train zero-shot $(SHIPPED_CLIPS)/shapes-noisy-clip.safetensors --n 1000 \
		--json $(RUNS)/shapes_noisy_clip/zero_shot.json

$(RUNS)/shapes_noisy_clip/clip_1250.safetensors: | $(VENV)/.installed
	$(SHAPES_NOISY_CLIP) --until 1250
	$(VENV)/bin/daguerre train export $(RUNS)/shapes_noisy_clip --step 1250 --out $@

$(RUNS)/shapes_clip/phase1.done: | $(VENV)/.installed
	$(SHAPES_CLIP) --until 1750
	touch $@

$(RUNS)/shapes_clip/phase2.done: $(RUNS)/shapes_clip/phase1.done
	$(SHAPES_CLIP) --set train.steps=4400 --until 2500
	touch $@

$(RUNS)/shapes_clip/clip.safetensors: $(RUNS)/shapes_clip/phase2.done
	$(SHAPES_CLIP) --set train.steps=5400

# fashion's stages read Fashion-MNIST (and its evaluation, the test split)
$(RUNS)/fashion_vae/vae.safetensors $(RUNS)/fashion_ldm/model.safetensors: | fashion-mnist

# shapes trains in four phases of one run and two fine-tuning runs (its model card): 8000 steps as configured;
# continued on the cosine of a 16000-step run with plain noise to step 10750, then offset noise 0.2 to 14000; from
# there a zero-terminal-SNR v-prediction model on the cosine of a 24000-step run, exported at step 17500. Phase 5
# fine-tunes that export (--init) on two-object relation scenes for 3250 steps, phase 6 fine-tunes phase 5 on
# scenes of 1-3 objects for 10000 steps; both draw the noisiest timesteps more often. A stamp file marks each phase.
SHAPES_LDM := $(VENV)/bin/daguerre train ldm --config shapes_ldm --vae $(RUNS)/shapes_vae/vae.safetensors \
	--out $(RUNS)/shapes_ldm --resume
SHAPES_ZSNR := --set loss.offset_noise=0.2 --set loss.min_snr_gamma=0 \
	--set model.schedule.zero_terminal_snr=true --set model.schedule.prediction_type=v_prediction \
	--set sample.schedule=Uniform
SHAPES_PHASE4_STEP := 17500
SHAPES_FT := $(VENV)/bin/daguerre train ldm --config shapes_ldm --vae $(RUNS)/shapes_vae/vae.safetensors \
	--resume $(SHAPES_ZSNR) --set data.cache_dir=$(RUNS)/shapes_ldm/latents --set train.warmup_steps=200 \
	--set data.p_relation=1.0 --set loss.timestep_bias=later --set loss.timestep_bias_portion=0.3 \
	--set loss.timestep_bias_multiplier=4.0

$(RUNS)/shapes_ldm/phase1.done: $(RUNS)/shapes_vae/vae.safetensors
	$(SHAPES_LDM)
	touch $@

$(RUNS)/shapes_ldm/phase2.done: $(RUNS)/shapes_ldm/phase1.done
	$(SHAPES_LDM) --set train.steps=16000 --until 10750
	touch $@

$(RUNS)/shapes_ldm/phase3.done: $(RUNS)/shapes_ldm/phase2.done
	$(SHAPES_LDM) --set train.steps=16000 --set loss.offset_noise=0.2 --until 14000
	touch $@

$(RUNS)/shapes_ldm/step_$(SHAPES_PHASE4_STEP).safetensors: $(RUNS)/shapes_ldm/phase3.done
	$(SHAPES_LDM) --set train.steps=24000 $(SHAPES_ZSNR) --until $(SHAPES_PHASE4_STEP)
	$(VENV)/bin/daguerre train export $(RUNS)/shapes_ldm --step $(SHAPES_PHASE4_STEP) --out $@

$(RUNS)/shapes_rel2/step_3250.safetensors: $(RUNS)/shapes_ldm/step_$(SHAPES_PHASE4_STEP).safetensors
	$(SHAPES_FT) --out $(RUNS)/shapes_rel2 --init $< --set train.steps=6000 --set train.lr=2e-4 \
		--set data.min_objects=2 --set data.max_objects=2 --set train.prune_vocabulary=false --until 3250
	$(VENV)/bin/daguerre train export $(RUNS)/shapes_rel2 --step 3250 --out $@

$(RUNS)/shapes_ldm/model.safetensors: $(RUNS)/shapes_rel2/step_3250.safetensors
	$(SHAPES_FT) --out $(RUNS)/shapes_mix --init $< --set train.steps=10000 --set train.lr=1e-4
	cp $(RUNS)/shapes_mix/model.safetensors $@

# issue 20: a LoRA that teaches the shipped shapes model a new shape, the hexagon (docs/lora.md): 40 hexagon images
# + 120 of the world's scenes (prior preservation), 600 steps (~8-12 min on one core), then the judged adherence.
.PHONY: lora-hexagon
lora-hexagon: $(RUNS)/hexagon_lora/hexagon_eval.json

$(RUNS)/hexagons/hexagon_000.txt:
	$(VENV)/bin/python -m daguerre.metrics.hexagon data $(RUNS)/hexagons --n 40 --regularisation 120

$(RUNS)/hexagon_lora/hexagon.safetensors: $(RUNS)/hexagons/hexagon_000.txt
	$(VENV)/bin/daguerre train lora --config shapes_hexagon_lora --model shapes --data $(RUNS)/hexagons \
		--out $(RUNS)/hexagon_lora --resume

$(RUNS)/hexagon_lora/hexagon_eval.json: $(RUNS)/hexagon_lora/hexagon.safetensors
	$(VENV)/bin/python -m daguerre.metrics.hexagon eval --model shapes --lora $<:1 --seeds 8 --json $@ \
		--grid $(RUNS)/hexagon_lora/hexagon_eval.png
	$(VENV)/bin/daguerre convert src/daguerre/assets/models/shapes.safetensors \
		$(RUNS)/hexagon_lora/shapes-hexagon.safetensors --lora $<:1
	$(VENV)/bin/daguerre eval --model $(RUNS)/hexagon_lora/shapes-hexagon.safetensors --prompts single --n 100 \
		--out $(RUNS)/hexagon_lora/eval-single

# issue 19 point 3: the compression study (docs/experiments/compression.md): KL and VQ autoencoders at f = 1, 2, 4, 8
# on the shapes world and Fashion-MNIST, a latent diffusion model on each, evaluated at kept steps, CPU time per task
# (~5-6 CPU-hours on one core). Resumable: the same command skips finished tasks and continues a stopped one.
COMPRESSION_OUT ?= $(RUNS)/compression
.PHONY: compression-study
compression-study: fashion-mnist
	OMP_NUM_THREADS=1 $(PY) bench/compression_study.py run --out $(COMPRESSION_OUT)
	$(PY) bench/compression_study.py report --out $(COMPRESSION_OUT) --png-dir docs/images/compression

# issue 18: the layout and semantic-map models (docs/layout.md), each fine-tuned from the shipped shapes model (its
# file is --init and, for its autoencoder, --vae) on the 50,000 free-placement scenes of 1-4 objects of its config; the
# three runs share one latent cache. Each target copies the model into the package (the GLIGEN run's adapter file
# alone, which names shapes as its base) and writes its evaluation: RUN/eval/report.json (box IoU and objects right
# for the layout models, the colour-blind mean IoU for the semantic one, also on 256x256 canvases of 4x4 held-out
# scenes: RUN/eval-tiles4).
.PHONY: model-shapes-semantic model-shapes-layout model-shapes-gligen
SHAPES_BASE := $(SHIPPED)/shapes.safetensors
SHAPES_18 := shapes_semantic shapes_layout shapes_gligen
EVAL_18 := $(VENV)/bin/daguerre eval --n 200 --overwrite

model-shapes-semantic: $(RUNS)/shapes_semantic/model.safetensors
	cp $< $(SHIPPED)/shapes-semantic.safetensors
	$(EVAL_18) --model $(SHIPPED)/shapes-semantic.safetensors --out $(RUNS)/shapes_semantic/eval
	$(VENV)/bin/daguerre eval --n 16 --overwrite --model $(SHIPPED)/shapes-semantic.safetensors --map-tiles 4 \
		--out $(RUNS)/shapes_semantic/eval-tiles4

model-shapes-layout: $(RUNS)/shapes_layout/model.safetensors
	cp $< $(SHIPPED)/shapes-layout.safetensors
	$(EVAL_18) --model $(SHIPPED)/shapes-layout.safetensors --out $(RUNS)/shapes_layout/eval

# the shipped adapter (its card): shapes_gligen_ldm, the adapter file alone shipped (it names its base)
model-shapes-gligen: $(RUNS)/shapes_gligen/model.safetensors
	cp $(RUNS)/shapes_gligen/adapter.safetensors $(SHIPPED)/shapes-gligen.safetensors
	$(EVAL_18) --model $(SHIPPED)/shapes-gligen.safetensors --layout-prompt none --out $(RUNS)/shapes_gligen/eval-none
	$(EVAL_18) --model $(SHIPPED)/shapes-gligen.safetensors --out $(RUNS)/shapes_gligen/eval
	$(EVAL_18) --model $(SHIPPED)/shapes-gligen.safetensors --layout-prompt background --out $(RUNS)/shapes_gligen/eval-background

$(SHAPES_18:%=$(RUNS)/%/model.safetensors): $(RUNS)/%/model.safetensors: | $(SHAPES_BASE) $(VENV)/.installed
	$(VENV)/bin/daguerre train ldm --config $*_ldm --vae $(SHAPES_BASE) --init $(SHAPES_BASE) --out $(RUNS)/$* \
		--set data.cache_dir=$(RUNS)/shapes_free_latents --resume
