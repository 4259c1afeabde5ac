#!/usr/bin/env bash
# Re-run the sweeps behind the README's tables and rebuild their reports.
#
#   scripts/reproduce.sh                 # every experiment below, the full protocol (hours on 2 cores)
#   scripts/reproduce.sh --quick         # a smoke version: one epoch, one seed (minutes), in results/quick
#   scripts/reproduce.sh --only heads --jobs 2
#
# Finished runs are skipped (a run's id hashes its resolved config), so an interrupted
# reproduction picks up where it stopped. Run `scripts/reproduce.sh -h` for every flag.
set -euo pipefail

# The experiments whose results the README shows, as experiments/<name>.toml, in the order
# they are run. Add a line here when a new table joins the README.
EXPERIMENTS=(
    reference   # the first command: the chapter's reference network
    dilations   # "The dilation study"
    backends    # "The plugins compared"
    heads       # "Likelihood heads and MNIST": the heads table
    mnist       # "Likelihood heads and MNIST": the binarised MNIST paragraph
    classic     # "The classic ARMs": FVSBN, NADE, MADE, RNN, MLP on digits
    classic_mnist  # "The classic ARMs": the same on mnist10k-binary (a 10-epoch budget)
    search      # "Random search with successive halving" (the unpruned comparison: see its file)
    quantile    # "The quantile head and sample quality"
    vae         # "VAEs with ARM priors and PixelCNN decoders": digits
    vae_mnist   # the same on mnist10k-binary (a 5-epoch budget)
    attention   # "Attention against convolutions": digits, 3 seeds
    attention_mnist  # the same on mnist10k-binary (a 1-epoch budget)
    best        # "PixelCNN++ and PixelSNAIL"
    best_gated  # "The gated PixelCNN for longer, and distribution augmentation": the heads
    augment     # the same section: distribution augmentation
    augment_mixture  # the same section: the transform mixture
    augment_long  # the same section: twice as long, the learning rate decayed half as fast
    augment_slow  # the same section: augment_long's learning-rate path stretched 5/3
    augment_dropout  # the same section: augment_long with dropout 0.3 and 0.4
    augment_dropout_long  # the same section: dropout 0.3 for up to 1200 epochs
    augment_deep  # the same section: dropout 0.3 with 7 gated layers
    augment_deep6  # the same section: the same with 6 gated layers
)

# --quick: every experiment gets these overrides (later --set wins over the file, its grid
# points and its [[zip]] groups, per-point seed lists included: every point trains seed 0).
QUICK_SETS=(train.max_epochs=1 'seeds=[0]')

# --quick: extra overrides for one experiment, when one epoch of it is still slow.
quick_sets_for() {
    case "$1" in
        # 28x28 images: one epoch of the full-size gated PixelCNN takes minutes on 2 cores.
        heads) echo 'model.gated_pixelcnn.channels=8' 'model.gated_pixelcnn.layers=2' ;;
        mnist) echo 'model.gated_pixelcnn.channels=8' 'model.gated_pixelcnn.layers=2' ;;
        # 784-step recurrences and 500-unit layers: small ones for the smoke run.
        classic_mnist) echo 'model.rnn.hidden=16' 'model.nade.hidden=16' 'model.made.hidden=[16]' ;;
        search) echo 'search.trials=3' ;;
        attention_mnist) echo 'model.gated_pixelcnn.channels=8' 'model.gated_pixelcnn.layers=2' 'model.transformer.width=32' 'model.transformer.depth=1' 'model.pixelsnail.nr_filters=8' 'model.pixelsnail.nr_blocks=1' ;;
        vae | vae_mnist) echo 'model.gated_pixelcnn.channels=8' 'model.gated_pixelcnn.layers=2' 'model.vae.iw_samples=8' ;;
        *) ;;
    esac
}

usage() {
    cat <<'EOF'
Usage: scripts/reproduce.sh [--quick] [--results DIR] [--jobs N] [--only NAME]... [-h]

Builds the release runner, sweeps experiments/<name>.toml for each experiment behind the
README's tables, then writes one report per experiment (runner report DIR/<name>) and a
combined one in DIR (report.md, nll_curves*.png, samples/).

  --quick        smoke version: one epoch, seed 0 only, smaller 28x28 models; results go to
                 results/quick unless --results is given. About 2 minutes on 2 cores.
  --results DIR  results folder (default: the repository's results/, or results/quick with
                 --quick; a relative DIR is taken from the current directory)
  --jobs N       runs trained at once by each sweep (default 1; the cores are split)
  --only NAME    run only this experiment (repeatable); NAME is experiments/NAME.toml
  -h, --help     this help

Experiments: reference dilations backends heads mnist classic classic_mnist search
Exit status: 0 when every step succeeded and no run failed; 1 otherwise; 2 for a bad flag.
EOF
}

die() { echo "reproduce.sh: $*" >&2; exit 1; }
bad_flag() { echo "reproduce.sh: $*" >&2; echo "Try 'scripts/reproduce.sh --help'." >&2; exit 2; }

quick=0
results=""
jobs=1
only=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) quick=1 ;;
        --results) [[ $# -ge 2 ]] || bad_flag "--results needs a folder"; results="$2"; shift ;;
        --results=*) results="${1#*=}" ;;
        --jobs) [[ $# -ge 2 ]] || bad_flag "--jobs needs a number"; jobs="$2"; shift ;;
        --jobs=*) jobs="${1#*=}" ;;
        --only) [[ $# -ge 2 ]] || bad_flag "--only needs an experiment name"; only+=("$2"); shift ;;
        --only=*) only+=("${1#*=}") ;;
        -h | --help) usage; exit 0 ;;
        *) bad_flag "unknown argument '$1'" ;;
    esac
    shift
done
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || bad_flag "--jobs: expected a positive whole number, got '$jobs'"
# A relative --results is relative to where the script was started, not to the repo root.
[[ -n "$results" && "$results" != /* ]] && results="$PWD/$results"

# Everything below runs from the repository root (this script lives in scripts/).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
# The default is the repository's own (git-ignored) results folder, wherever this was started.
if [[ -z "$results" ]]; then
    results="$root/results"
    [[ $quick -eq 1 ]] && results="$root/results/quick"
fi

if [[ ${#only[@]} -gt 0 ]]; then
    selected=("${only[@]}")
else
    selected=("${EXPERIMENTS[@]}")
fi
for name in "${selected[@]}"; do
    [[ -f "experiments/$name.toml" ]] || bad_flag "no experiment file experiments/$name.toml (known: ${EXPERIMENTS[*]})"
done

step() { printf '\n==> %s\n' "$*"; }
started=$SECONDS

step "cargo build --release"
cargo build --release || die "cargo build --release failed"
runner="$root/target/release/runner"
[[ -x "$runner" ]] || die "$runner was not built"

mode="full protocol"
[[ $quick -eq 1 ]] && mode="quick: ${QUICK_SETS[*]} (+ smaller 28x28 models)"
echo "experiments: ${selected[*]}"
echo "results:     $results"
echo "mode:        $mode"

for name in "${selected[@]}"; do
    sets=()
    if [[ $quick -eq 1 ]]; then
        read -r -a extra <<<"$(quick_sets_for "$name")"
        for s in "${QUICK_SETS[@]}" ${extra[@]+"${extra[@]}"}; do
            sets+=(--set "$s")
        done
    fi
    step "sweep experiments/$name.toml ${sets[*]+${sets[*]}}"
    t0=$SECONDS
    "$runner" --results "$results" sweep "experiments/$name.toml" --jobs "$jobs" ${sets[@]+"${sets[@]}"} ||
        die "the sweep of experiments/$name.toml failed (exit $?)"
    # Augmented runs evaluated at the identity: their transform mixture as well, which the
    # report shows beside it ("mixture test NLL").
    for run in "$results/$name"/runs/*/; do
        [[ -f "$run/model.safetensors" && ! -f "$run/eval_test_mixture.parquet" ]] || continue
        grep -q '^augment = \["' "$run/config.toml" && ! grep -q '^augment_eval = "mixture"' "$run/config.toml" || continue
        "$runner" --results "$results" eval "$run" --augment-eval mixture ||
            die "runner eval $run --augment-eval mixture failed (exit $?)"
    done
    echo "($name: $((SECONDS - t0)) s)"
done

dirs=()
for name in "${selected[@]}"; do
    step "report $results/$name"
    "$runner" --results "$results" report "$results/$name" || die "the report of $results/$name failed (exit $?)"
    dirs+=("$results/$name")
done
if [[ ${#dirs[@]} -gt 1 ]]; then
    step "combined report of ${selected[*]} -> $results/report.md"
    "$runner" --results "$results" report "${dirs[@]}" --out "$results" || die "the combined report failed (exit $?)"
fi

# A run that failed (say a NaN loss) leaves its row out of the tables: say so, and fail.
failed=()
for name in "${selected[@]}"; do
    for status in "$results/$name"/runs/*/status.toml; do
        [[ -f "$status" ]] && grep -q '^status = "failed"' "$status" && failed+=("${status%/status.toml}")
    done
done
reports="$results/<name>/report.md"
[[ ${#dirs[@]} -gt 1 ]] && reports+=" and $results/report.md"
step "done in $((SECONDS - started)) s; reports: $reports"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "reproduce.sh: ${#failed[@]} run(s) failed (reasons in their status.toml and in the reports):" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
