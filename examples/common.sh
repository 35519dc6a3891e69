# Shared settings of the example scripts (sourced, not run). Every knob is an environment variable
# with the field's standard as its default; the tests set them for the toy world.
NEGALIGN=${NEGALIGN:-negalign}      # the command (e.g. ".venv/bin/negalign" after `make install`)
MODEL=${MODEL:-ViT-B-16}            # open_clip architecture or project model (negalign-toy)
PRETRAINED=${PRETRAINED:-}          # open_clip tag or checkpoint file; ViT-B-16 alone means OpenAI's
DEVICE=${DEVICE:-auto}              # auto, cpu, cuda, cuda:N
PRECISION=${PRECISION:-fp32}        # fp32, bf16, fp16 (CUDA)
CACHE=${CACHE:-}                    # --cache-dir (default: $NEGALIGN_CACHE, else ./.negalign-cache)
NOUNS=${NOUNS-negrefine-imagenet-noun}  # noun negatives: a bundled list or a file ("" for none)
ADJS=${ADJS-negrefine-imagenet-adj}     # adjective-phrase negatives ("" for none)
TAU=${TAU:-0.05}                    # split threshold: obj if r >= tau, bg if r <= -tau
NEG_GROUPS=${NEG_GROUPS:-100}       # NegLabel's groups (not GROUPS: bash keeps that name for itself)
CAM_METHOD=${CAM_METHOD:-gradcam}   # gradcam (NegAlign's) or gradxact
BLOCK=${BLOCK:--1}                  # the block whose ln_1 output Grad-CAM reads
LAMBDAS=${LAMBDAS:-sweep}           # NegAlign's λ: sweep, a list 0,1,2 or one value
WORKERS=${WORKERS:-}                # DataLoader workers (default: cores - 1)

read -r -a NL <<< "$NEGALIGN"       # a command of several words works too ("python -m negalign_cli")
RUNTIME=(--model "$MODEL" --device "$DEVICE" --precision "$PRECISION")
[ -n "$PRETRAINED" ] && RUNTIME+=(--pretrained "$PRETRAINED")
[ -n "$CACHE" ] && RUNTIME+=(--cache-dir "$CACHE")
NEGATIVES=(--tau "$TAU")
[ -n "$NOUNS" ] && NEGATIVES+=(--nouns "$NOUNS")
[ -n "$ADJS" ] && NEGATIVES+=(--adjs "$ADJS")
IMAGE_ARGS=()
[ -n "$WORKERS" ] && IMAGE_ARGS+=(--workers "$WORKERS")
EVAL_CACHE=()
[ -n "$CACHE" ] && EVAL_CACHE+=(--cache-dir "$CACHE")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # a missing weight file fails at once, not after retries
