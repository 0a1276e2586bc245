//! `tessera-host`: Tessera's native participant.
//!
//! `tessera-host train` trains the shared model locally on CPU or wgpu with the same core the
//! browser runs; `tessera-host join` contributes to a relay's run; `tessera-host ledger verify`
//! checks the relay's contribution ledger and this key's stake in it.

mod backend;
mod corpus;
mod export;
mod join;
mod ledger;
mod store;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera-host", version, about = "Tessera native participant")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model locally and report its validation loss.
    Train(train::TrainArgs),
    /// Join a relay's run and train work units until stopped.
    Join(join::JoinArgs),
    /// Print text sampled from a checkpoint.
    Sample(train::SampleArgs),
    /// Print this participant's id (creating its key on first use).
    Id(join::IdArgs),
    /// Check a relay's contribution ledger, this key's receipts and every stake.
    Ledger(ledger::LedgerArgs),
    /// Write the model as a Hugging Face `GPT2LMHeadModel` folder.
    Export(export::ExportArgs),
}

/// mimalloc keeps freed pages for the next allocation. With glibc's defaults every large tensor
/// of a training step was a fresh mapping whose pages faulted in one by one (a baby step at 2
/// threads: ~42-52 ms with glibc, ~35 ms with mimalloc; BENCHMARKS.md, "Speed").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(args) => train::run(args),
        Command::Sample(args) => train::sample(args),
        Command::Join(args) => join::run(args),
        Command::Id(args) => join::print_id(args),
        Command::Ledger(args) => ledger::run(args),
        Command::Export(args) => export::run(args),
    }
}
