//! The `kxp` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kxp_control::replay::{counter_summary, explain, run, ReplayArgs};
use kxp_dataplane::pipeline::WorkerConfig;

#[derive(Debug, Parser)]
#[command(name = "kxp", version, about = "Userspace Kubernetes Service dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a capture through the packet pipeline (one worker, clock from the capture).
    Replay {
        /// Kubernetes manifests: a YAML/JSON file or a directory of them.
        #[arg(long)]
        manifests: PathBuf,
        /// The node file.
        #[arg(long)]
        node: PathBuf,
        /// Input capture (pcap, Ethernet).
        #[arg(long = "in")]
        input: PathBuf,
        /// Output capture: every forwarded or generated frame, in order.
        #[arg(long = "out")]
        output: PathBuf,
        /// JSON-lines report, one line per input frame.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Ingress interface for every frame: `auto` (by source address) or a name from
        /// the node file.
        #[arg(long, default_value = "auto")]
        ingress: String,
        /// Print one readable line per frame.
        #[arg(long)]
        explain: bool,
        /// Masquerade all service traffic (kube-proxy's masqueradeAll).
        #[arg(long)]
        masquerade_all: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Replay {
            manifests,
            node,
            input,
            output,
            report,
            ingress,
            explain: show,
            masquerade_all,
        } => {
            let args = ReplayArgs {
                manifests,
                node,
                input,
                output,
                report,
                ingress: Some(ingress),
                worker: WorkerConfig {
                    masquerade_all,
                    ..WorkerConfig::default()
                },
            };
            match run(&args) {
                Ok(o) => {
                    for n in &o.notices {
                        eprintln!("notice: {n}");
                    }
                    for e in &o.config_errors {
                        eprintln!("error: {e}");
                    }
                    if show {
                        print!("{}", explain(&o));
                    }
                    println!("{} frames replayed; counters:", o.frames);
                    print!("{}", counter_summary(&o.counters));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("kxp replay: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
