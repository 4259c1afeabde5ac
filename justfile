# Recipes mirror the README's commands.

# Train the chapter's reference model (causal Conv1d on digits).
run:
    cargo run --release -- train experiments/reference.toml

# Run every test (release profile: the same build as the binary).
test:
    cargo test --release --workspace

# Sweep an experiment grid: just sweep experiments/dilations.toml
sweep FILE *ARGS:
    cargo run --release -- sweep {{FILE}} {{ARGS}}

# NLL tables and plots for everything under results/.
report *ARGS:
    cargo run --release -- report {{ARGS}}

# report.html for an experiment folder, checked in headless Chromium: just report-html results/quickstart
report-html DIR:
    cargo run --release -- report --html {{DIR}}
    scripts/check_report_html.sh {{DIR}}

bench *ARGS:
    cargo run --release -- bench {{ARGS}}

# What a sweep is doing (add --watch to refresh): just status
status *ARGS:
    cargo run --release -- status {{ARGS}}
