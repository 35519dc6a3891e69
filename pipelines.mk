# pipelines.mk — the method's two experiments as Make pipelines (included by the Makefile).
#
#   make waterbirds WATERBIRDS=/data/waterbird_complete95_forest2water2 PLACESBG=/data/placesbg \
#        MODEL=ViT-B-16 PRETRAINED=openai DEVICE=cuda PRECISION=fp16
#   make imagenet IMAGENET=/data/imagenet/val \
#        OOD="inaturalist=/data/iNaturalist sun=/data/SUN places=/data/Places textures=/data/dtd/images"
#
# Every step is a file target (the --out folder's manifest.json, scores.parquet, results.json), so
# `make -n waterbirds` prints the plan and a second `make` runs only what is out of date. Each
# step also records its settings in $(OUT)/<experiment>/.knobs/<step>; a step whose settings
# changed reruns with everything after it, and nothing before it; a step whose output, as the next
# step reads it, came out unchanged stops there (TAU=0.1 moving no word between the split's roles
# reruns split-vocab alone: see .content below). Underneath, negalign's
# content cache keeps every encoded image and word: a rerun after `make -B` only hashes files.
# Make does not watch the image folders (only Waterbirds' metadata.csv): after changing images,
# run with -B (cheap: unchanged images come from the cache).

NEGALIGN ?= $(BIN)/negalign
# made before the first step (order only): the .venv; set it empty when NEGALIGN lives elsewhere
PIPELINE_SETUP ?= $(STAMP)

# Model and runtime
MODEL      ?= ViT-B-16
PRETRAINED ?=
DEVICE     ?= auto
PRECISION  ?= fp32
BATCH      ?=
WORKERS    ?=
CACHE      ?=
OUT        ?= runs

# Negative labels and their split
NOUNS ?= negrefine-imagenet-noun
ADJS  ?= negrefine-imagenet-adj
TAU   ?= 0.05

# CAM (P_align)
CAM_METHOD    ?= gradcam
BLOCK         ?= -1
FG_PERCENTILE ?= 80
DILATE        ?= 1
BG_POOL       ?= tokens

# Scores: NegLabel groups, M1 (NEG_TOPK=K), M2 (ROLE_AWARE=1), invalid-CAM policy
GROUPS      ?= 100
NEG_TOPK    ?=
ROLE_AWARE  ?= 1
INVALID_CAM ?= fallback

# Evaluation: λ (sweep, a list 0,1,2 or one value), M3 (SCALE_STABILIZE=1), metric convention
LAMBDAS         ?= sweep
SCALE_STABILIZE ?=
METRICS         ?= neglabel

# WaterBirds: the folder holding metadata.csv, the split scored as ID, and placesbg
WATERBIRDS       ?=
WATERBIRDS_SPLIT ?= test
PLACESBG         ?=
WATERBIRDS_CLASSES ?= waterbird

# ImageNet: ID images (folder or manifest) and the OOD sets as NAME=PATH words
IMAGENET         ?=
IMAGENET_SPLIT   ?=
IMAGENET_CLASSES ?= imagenet
OOD              ?=

WB := $(OUT)/waterbirds
IN := $(OUT)/imagenet

yes = $(filter 1 yes true on,$(1))
RUNTIME_ARGS = --model $(MODEL) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) --device $(DEVICE) \
    --precision $(PRECISION) $(if $(CACHE),--cache-dir $(CACHE)) $(if $(BATCH),--batch-size $(BATCH))
SPLIT_ARGS = $(if $(NOUNS),--nouns $(NOUNS)) $(if $(ADJS),--adjs $(ADJS)) --tau $(TAU)
CAM_ARGS = --cam-method $(CAM_METHOD) --block=$(BLOCK) --fg-percentile $(FG_PERCENTILE) --dilate $(DILATE) \
    --bg-pool $(BG_POOL) $(if $(WORKERS),--workers $(WORKERS))
SCORE_ARGS = --groups $(GROUPS) $(if $(NEG_TOPK),--neg-topk $(NEG_TOPK)) \
    $(if $(call yes,$(ROLE_AWARE)),--role-aware) --invalid-cam $(INVALID_CAM)
EVAL_ARGS = --compare --lambda $(LAMBDAS) --metrics $(METRICS) $(if $(call yes,$(SCALE_STABILIZE)),--scale-stabilize) \
    $(if $(CACHE),--cache-dir $(CACHE))

.PHONY: waterbirds waterbirds-results imagenet imagenet-results pipelines-help

pipelines-help:
	@echo "make waterbirds WATERBIRDS=DIR PLACESBG=DIR [MODEL=ViT-B-16 PRETRAINED=openai DEVICE=cuda]"
	@echo "make imagenet IMAGENET=DIR OOD=\"inaturalist=DIR sun=DIR ...\""
	@echo "knobs: TAU LAMBDAS GROUPS NEG_TOPK ROLE_AWARE SCALE_STABILIZE CAM_METHOD BLOCK FG_PERCENTILE"
	@echo "       DILATE BG_POOL INVALID_CAM PRECISION DEVICE BATCH WORKERS CACHE OUT (make -n shows the plan)"

# $(call knob,FILE,SETTINGS): FILE holds SETTINGS, rewritten (made newer) only when they change;
# evaluated while make reads this file, and only for a pipeline goal. Under `make -n` nothing is
# written: a FILE whose settings differ is marked out of date instead, so the plan is the real one.
PIPELINE_GOALS := $(filter waterbirds waterbirds-results imagenet imagenet-results $(WB)/% $(IN)/%,$(MAKECMDGOALS))
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))$(findstring q,$(firstword -$(MAKEFLAGS)))
knob_differs = $(shell printf '%s\n' '$(strip $(2))' | cmp -s - $(1) 2>/dev/null || echo differs)
knob_write = $(shell mkdir -p $(dir $(1)) && { printf '%s\n' '$(strip $(2))' | cmp -s - $(1) 2>/dev/null \
    || printf '%s\n' '$(strip $(2))' > $(1); })
knob = $(if $(PIPELINE_GOALS),$(if $(DRY_RUN),$(if $(call knob_differs,$(1),$(2)),$(eval .PHONY: $(1))$(eval CHANGED_KNOBS += $(1))),$(call knob_write,$(1),$(2))))

# $(call content,FILE,MANIFEST,KNOB) and a rule `FILE: MANIFEST` with $(call content_recipe,FILE,OUTPUT):
# FILE holds the sha256 of OUTPUT (what the next step reads of a step whose MANIFEST records more,
# e.g. split-vocab's TAU), rewritten only when it changes; the next step depends on FILE. GNU make
# reads a target's time again after its recipe ran, so an unchanged FILE leaves the steps after it
# alone (the check runs again at the next make: a sha256 of one small file). Under `make -n`
# nothing is written: FILE is marked out of date when the step is planned (its KNOB changed, or its
# MANIFEST is missing or older than KNOB), so the plan shows what may follow; otherwise its recipe
# is empty under -n and run (`+`), and make, finding FILE unchanged, plans nothing after it. `make -t`
# touches FILE like any target.
dry_remade = $(or $(filter $(3),$(CHANGED_KNOBS)),$(shell test $(2) -nt $(3) || echo yes))
content = $(if $(PIPELINE_GOALS),$(if $(DRY_RUN),$(if $(call dry_remade,$(1),$(2),$(3)),$(eval .PHONY: $(1)))))
content_recipe = $(if $(DRY_RUN),+@,@mkdir -p $(dir $(1)) && sha256sum < $(2) > $(1).new && \
    if cmp -s $(1).new $(1); then rm -f $(1).new; else mv -f $(1).new $(1); fi)

need = $(if $($(1)),,$(error make $(2) needs $(1)=$(3)))

# ----------------------------------------------------------------------------- WaterBirds
ifneq ($(filter waterbirds waterbirds-results,$(MAKECMDGOALS)),)
$(call need,WATERBIRDS,waterbirds,DIR (the folder with metadata.csv))
$(call need,PLACESBG,waterbirds,DIR (the placesbg images))
endif

WB_SCORES := $(WB)/scores/id/scores.parquet $(WB)/scores/placesbg/scores.parquet

waterbirds: $(WB)/report/report.html
waterbirds-results: $(WB)/results/results.json

$(call knob,$(WB)/.knobs/split,$(RUNTIME_ARGS) $(SPLIT_ARGS))
$(call knob,$(WB)/.knobs/cam,$(RUNTIME_ARGS) $(CAM_ARGS) $(WATERBIRDS_CLASSES) $(WATERBIRDS_SPLIT) $(WATERBIRDS) $(PLACESBG))
$(call knob,$(WB)/.knobs/score,$(SCORE_ARGS))
$(call knob,$(WB)/.knobs/evaluate,$(EVAL_ARGS))

$(WB)/split/manifest.json: $(WB)/.knobs/split | $(PIPELINE_SETUP)
	$(NEGALIGN) split-vocab $(SPLIT_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(WB)/cam/id/manifest.json: $(WB)/.knobs/cam $(if $(WATERBIRDS),$(WATERBIRDS)/metadata.csv) | $(PIPELINE_SETUP)
	$(NEGALIGN) cam --images $(WATERBIRDS)/metadata.csv --split $(WATERBIRDS_SPLIT) \
	    --classes $(WATERBIRDS_CLASSES) $(CAM_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(WB)/cam/placesbg/manifest.json: $(WB)/.knobs/cam | $(PIPELINE_SETUP)
	$(NEGALIGN) cam --images $(PLACESBG) --classes $(WATERBIRDS_CLASSES) $(CAM_ARGS) $(RUNTIME_ARGS) --out $(@D)

# score reads the split's split_scores.csv (words, sources, roles), not the TAU its manifest records
$(call content,$(WB)/.content/split,$(WB)/split/manifest.json,$(WB)/.knobs/split)
$(WB)/.content/split: $(WB)/split/manifest.json
	$(call content_recipe,$@,$(WB)/split/split_scores.csv)

$(WB_SCORES): $(WB)/scores/%/scores.parquet: $(WB)/cam/%/manifest.json $(WB)/.content/split $(WB)/.knobs/score
	$(NEGALIGN) score --images-dir $(WB)/cam/$* --classes $(WATERBIRDS_CLASSES) --negatives-split $(WB)/split \
	    $(SCORE_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(WB)/results/results.json: $(WB_SCORES) $(WB)/.knobs/evaluate
	$(NEGALIGN) evaluate --id $(WB)/scores/id/scores.parquet --ood placesbg=$(WB)/scores/placesbg/scores.parquet \
	    $(EVAL_ARGS) --out $(@D)

$(WB)/report/report.html: $(WB)/results/results.json
	$(NEGALIGN) report $(WB)/results --out $(@D)

# ----------------------------------------------------------------------------- ImageNet
ifneq ($(filter imagenet imagenet-results,$(MAKECMDGOALS)),)
$(call need,IMAGENET,imagenet,DIR (ImageNet-1K val: a folder or a manifest))
$(call need,OOD,imagenet,"NAME=DIR NAME=DIR ..." (the OOD sets))
endif

OOD_NAMES := $(foreach pair,$(OOD),$(firstword $(subst =, ,$(pair))))
ood_path = $(patsubst $(1)=%,%,$(filter $(1)=%,$(OOD)))
IN_OOD_CAMS := $(foreach name,$(OOD_NAMES),$(IN)/cam/ood-$(name)/manifest.json)
IN_OOD_SCORES := $(foreach name,$(OOD_NAMES),$(IN)/scores/ood-$(name)/scores.parquet)

imagenet: $(IN)/report/report.html
imagenet-results: $(IN)/results/results.json

$(call knob,$(IN)/.knobs/split,$(RUNTIME_ARGS) $(SPLIT_ARGS))
$(call knob,$(IN)/.knobs/cam,$(RUNTIME_ARGS) $(CAM_ARGS) $(IMAGENET_CLASSES) $(IMAGENET_SPLIT) $(IMAGENET) $(OOD))
$(call knob,$(IN)/.knobs/score,$(SCORE_ARGS))
$(call knob,$(IN)/.knobs/evaluate,$(EVAL_ARGS) $(OOD_NAMES))

$(IN)/split/manifest.json: $(IN)/.knobs/split | $(PIPELINE_SETUP)
	$(NEGALIGN) split-vocab $(SPLIT_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(IN)/cam/id/manifest.json: $(IN)/.knobs/cam | $(PIPELINE_SETUP)
	$(NEGALIGN) cam --images $(IMAGENET) $(if $(IMAGENET_SPLIT),--split $(IMAGENET_SPLIT)) \
	    --classes $(IMAGENET_CLASSES) $(CAM_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(IN_OOD_CAMS): $(IN)/cam/ood-%/manifest.json: $(IN)/.knobs/cam | $(PIPELINE_SETUP)
	$(NEGALIGN) cam --images $(call ood_path,$*) --classes $(IMAGENET_CLASSES) $(CAM_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(call content,$(IN)/.content/split,$(IN)/split/manifest.json,$(IN)/.knobs/split)
$(IN)/.content/split: $(IN)/split/manifest.json
	$(call content_recipe,$@,$(IN)/split/split_scores.csv)

$(IN)/scores/id/scores.parquet $(IN_OOD_SCORES): $(IN)/scores/%/scores.parquet: $(IN)/cam/%/manifest.json $(IN)/.content/split $(IN)/.knobs/score
	$(NEGALIGN) score --images-dir $(IN)/cam/$* --classes $(IMAGENET_CLASSES) --negatives-split $(IN)/split \
	    $(SCORE_ARGS) $(RUNTIME_ARGS) --out $(@D)

$(IN)/results/results.json: $(IN)/scores/id/scores.parquet $(IN_OOD_SCORES) $(IN)/.knobs/evaluate
	$(NEGALIGN) evaluate --id $(IN)/scores/id/scores.parquet \
	    $(foreach name,$(OOD_NAMES),--ood $(name)=$(IN)/scores/ood-$(name)/scores.parquet) $(EVAL_ARGS) --out $(@D)

$(IN)/report/report.html: $(IN)/results/results.json
	$(NEGALIGN) report $(IN)/results --out $(@D)

# Every artifact is named (static pattern rules over the lists above, never a bare pattern rule), so
# none is an intermediate file that make deletes at the end of a run: a deleted manifest.json would
# make the next run redo its step (`TAU=0.1 make -n imagenet` would plan cam again). .SECONDARY
# with no prerequisites keeps any intermediate a future pattern rule might make (GNU make 4.3 has
# no .NOTINTERMEDIATE). .PRECIOUS: a step's output stays when make is interrupted or a later step
# fails (the --out folders are written by the commands themselves).
.SECONDARY:
.PRECIOUS: $(WB)/split/manifest.json $(WB)/cam/id/manifest.json $(WB)/cam/placesbg/manifest.json $(WB_SCORES) \
    $(IN)/split/manifest.json $(IN)/cam/id/manifest.json $(IN_OOD_CAMS) $(IN)/scores/id/scores.parquet $(IN_OOD_SCORES)
