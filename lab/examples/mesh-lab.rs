//! `mesh lab` without the rest of the `mesh` binary: handy while hacking on
//! the harness (`cargo run -p mesh-lab --example mesh-lab -- --mesh-bin target/debug/mesh up`).

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The `mesh` binary daemons are started from
    #[arg(long, default_value = "target/debug/mesh")]
    mesh_bin: PathBuf,
    #[command(subcommand)]
    cmd: mesh_lab::LabCommand,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = mesh_lab::run(args.cmd, &args.mesh_bin) {
        eprintln!("mesh lab: {e}");
        std::process::exit(1);
    }
}
